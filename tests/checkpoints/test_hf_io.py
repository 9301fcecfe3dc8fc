"""from_pretrained / save_pretrained against transformers: exact round trips and error reports.

Round trips are bit-exact: every tensor transformers reloads from our save equals the original
(torch.equal), so logits match with max abs diff 0.0 (measured, every architecture below).
"""
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

import blip2_jax
from blip2_jax.checkpoints import io, parity, tiny
from blip2_jax.models import blip2

CASES = {  # name -> (architecture, family, text_overrides)
    "opt": ("Blip2ForConditionalGeneration", "opt", None),
    "t5": ("Blip2ForConditionalGeneration", "t5", None),
    # transformers 5 ties T5 in the config and unties when the weights hold a distinct
    # lm_head.weight (old checkpoints, e.g. BLIP-2 FlanT5): built by adding one, see `src`
    "t5-untied": ("Blip2ForConditionalGeneration", "t5", None),
    "llama": ("Blip2ForConditionalGeneration", "llama", None),
    "llama-untied": ("Blip2ForConditionalGeneration", "llama", {"tie_word_embeddings": False}),
    "instructblip": ("InstructBlipForConditionalGeneration", "t5", None),
    "retrieval": ("Blip2ForImageTextRetrieval", None, None),
}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
  """Tiny random HF checkpoints, built once per module on first use."""
  made = {}

  def get(name):
    if name not in made:
      arch, family, ov = CASES[name]
      d = tiny.save_tiny(str(tmp_path_factory.mktemp(name)), arch, family, text_overrides=ov)
      if name == "t5-untied":
        t = _st_tensors(d)
        shared = t["language_model.shared.weight"]
        t["language_model.lm_head.weight"] = shared[::-1] * 0.5  # distinct from the embedding
        io.save_state_dict(d, t)
      made[name] = d
    return made[name]
  return get


def _hf(path, arch, **kw):
  return getattr(transformers, arch).from_pretrained(path, attn_implementation="eager", **kw).eval()


def _hf_checked(path, arch, **kw):
  """Loads with transformers and asserts it reports no missing / unexpected / mismatched keys."""
  model, info = getattr(transformers, arch).from_pretrained(
      path, attn_implementation="eager", output_loading_info=True, **kw)
  assert {k: v for k, v in info.items() if v} == {}, info
  return model.eval()


def _assert_same_state(a, b):
  sa, sb = a.state_dict(), b.state_dict()
  assert sa.keys() == sb.keys()
  bad = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
  assert not bad, bad


def _logits(hf, model_cfg):
  inp = parity.make_inputs(model_cfg, batch=2)
  return parity._hf_forward(hf, model_cfg, inp, torch)


def _st_tensors(path):
  r = io.open_checkpoint(path)
  return {k: np.asarray(r.get(k)) for k in r.keys()}


@pytest.mark.parametrize("name", list(CASES))
def test_save_pretrained_round_trip_is_exact(src, tmp_path, name):
  arch = CASES[name][0]
  d = src(name)
  model, params = blip2_jax.from_pretrained(d)
  out = str(tmp_path / "out")
  blip2_jax.save_pretrained(model, params, out)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  ref, back = _hf(d, arch), _hf_checked(out, arch)
  _assert_same_state(ref, back)
  # config.json round trips exactly (architectures, image_token_index, tie flags, dtype, ...)
  with open(f"{d}/config.json") as f, open(f"{out}/config.json") as g:
    assert json.load(f) == json.load(g)
  a, b = _logits(ref, model.config), _logits(back, model.config)
  assert a.keys() == b.keys()
  for k in a:
    assert np.abs(a[k] - b[k]).max() == 0.0, k  # measured 0.0 for every stage
  # and our own loader reads our save back to the same params
  _, again = blip2_jax.from_pretrained(out)
  fa, fb = io.flatten(params), io.flatten(again)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_untied_t5_head_is_saved_and_reloaded_untied(src, tmp_path):
  model, params = blip2_jax.from_pretrained(src("t5-untied"))
  assert not model.config.text.tie_word_embeddings
  out = str(tmp_path / "out")
  blip2_jax.save_pretrained(model, params, out)
  saved = io.open_checkpoint(out)
  assert "language_model.lm_head.weight" in saved
  assert not np.array_equal(np.asarray(saved.get("language_model.lm_head.weight")),
                            np.asarray(saved.get("language_model.shared.weight")))
  back = _hf_checked(out, "Blip2ForConditionalGeneration")
  lm = back.language_model
  assert not torch.equal(lm.lm_head.weight, lm.shared.weight)


def test_bfloat16_save(src, tmp_path):
  d = src("opt")
  model, params = blip2_jax.from_pretrained(d)
  out = str(tmp_path / "bf16")
  blip2_jax.save_pretrained(model, params, out, dtype=jnp.bfloat16)
  t = _st_tensors(out)
  assert {v.dtype for v in t.values()} == {np.dtype(ml_dtypes.bfloat16)}
  with open(f"{out}/config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  ref = _hf(d, "Blip2ForConditionalGeneration", dtype=torch.bfloat16)  # torch's own cast: same rounding
  back = _hf_checked(out, "Blip2ForConditionalGeneration", dtype=torch.bfloat16)
  _assert_same_state(ref, back)
  # our loader reads bf16 into float32 (exactly the rounded values) or keeps bf16
  _, p32 = blip2_jax.from_pretrained(out)
  k = p32["language_model"]["model"]["decoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert k.dtype == jnp.float32
  want = np.asarray(params["language_model"]["model"]["decoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"])
  np.testing.assert_array_equal(np.asarray(k), want.astype(ml_dtypes.bfloat16).astype(np.float32))
  m16, p16 = blip2_jax.from_pretrained(out, dtype=jnp.bfloat16)
  assert p16["vision_model"]["embeddings"]["patch_embedding"]["kernel"].dtype == jnp.bfloat16
  assert p16["query_tokens"].dtype == jnp.float32  # the Q-Former keeps float32 params, as in HF


def test_sharded_save_and_stale_files(src, tmp_path):
  d = src("llama")
  model, params = blip2_jax.from_pretrained(d)
  out = str(tmp_path / "sharded")
  blip2_jax.save_pretrained(model, params, out, max_shard_bytes=40_000)
  files = sorted(os.listdir(out))
  shards = [f for f in files if f.startswith("model-")]
  assert len(shards) >= 3 and io.INDEX_NAME in files and io.WEIGHTS_NAME not in files, files
  with open(f"{out}/{io.INDEX_NAME}") as f:
    index = json.load(f)
  assert set(index["weight_map"].values()) == set(shards)
  _assert_same_state(_hf(d, "Blip2ForConditionalGeneration"), _hf_checked(out, "Blip2ForConditionalGeneration"))
  _, again = blip2_jax.from_pretrained(out)
  for k, v in io.flatten(params).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(io.flatten(again)[k]), err_msg=k)
  # Saving again unsharded into the same directory removes the old shards and index (the index
  # would otherwise be read first and shadow the new file).
  params2 = dict(params, query_tokens=params["query_tokens"] + 1.0)
  blip2_jax.save_pretrained(model, params2, out)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  _, p3 = blip2_jax.from_pretrained(out)
  np.testing.assert_array_equal(np.asarray(p3["query_tokens"]), np.asarray(params2["query_tokens"]))


def test_scanned_params_save_unstacked(src, tmp_path):
  d = src("opt")
  model, params = blip2_jax.from_pretrained(d, scan=True)
  assert "layers" in params["language_model"]["model"]["decoder"]  # really scanned
  out = str(tmp_path / "scan")
  blip2_jax.save_pretrained(model, params, out)
  a, b = _st_tensors(d), _st_tensors(out)
  # transformers 5 drops the tied OPT lm_head copy on save; so do we
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  _hf_checked(out, "Blip2ForConditionalGeneration")


def test_to_state_dict_boxed_and_incomplete(src):
  model, params = blip2_jax.from_pretrained(src("retrieval"))
  rules = blip2.hf_rules(model.config)
  abstract = io.abstract_params(model, **blip2.dummy_inputs(model.config))
  boxed = jax.tree.map(lambda box, v: box.replace_boxed(v), abstract, params,
                       is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert isinstance(boxed["itm_head"]["kernel"], nn.Partitioned)
  sd = io.to_state_dict(boxed, rules)  # nn.Partitioned boxes are unboxed, not saved as objects
  plain = io.to_state_dict(params, rules)
  assert sd.keys() == plain.keys()
  for k in sd:
    assert isinstance(sd[k], np.ndarray)
    np.testing.assert_array_equal(sd[k], plain[k], err_msg=k)
  broken = dict(params)
  del broken["itm_head"]
  with pytest.raises(ValueError, match=r"rules without a parameter: itm_head/kernel"):
    io.to_state_dict(broken, rules)
  # integer leaves keep their dtype under dtype=
  out = io.to_state_dict({"a": np.arange(3, dtype=np.int32), "b": np.ones(2, np.float32)},
                         [io.Rule("a", "a"), io.Rule("b", "b")], dtype=jnp.bfloat16)
  assert out["a"].dtype == np.int32 and out["b"].dtype == ml_dtypes.bfloat16


# ----------------------------------------------------------------------------------------
# errors: each names the problem; nothing is read before the whole checkpoint is validated


def _copy(d, tmp_path, name="bad"):
  out = str(tmp_path / name)
  shutil.copytree(d, out)
  return out


def test_directory_without_config(src, tmp_path):
  d = _copy(src("opt"), tmp_path)
  os.remove(f"{d}/config.json")
  with pytest.raises(FileNotFoundError, match="config.json"):
    blip2_jax.from_pretrained(d)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    blip2_jax.from_pretrained(f"{d}/model.safetensors")


def test_not_a_blip2_checkpoint(tmp_path):
  cfg = tiny.tiny_text_config("opt")
  transformers.OPTForCausalLM(cfg).save_pretrained(str(tmp_path))
  with pytest.raises(blip2_jax.CheckpointError, match=r"'opt' checkpoint.*OPTForCausalLM.*not a BLIP-2"):
    blip2_jax.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_invalid_config_json(src, tmp_path, text):
  d = _copy(src("opt"), tmp_path)
  with open(f"{d}/config.json", "w") as f:
    f.write(text)
  with pytest.raises(blip2_jax.CheckpointError, match="config.json"):
    blip2_jax.from_pretrained(d)


def test_unsupported_text_model(src, tmp_path):
  d = _copy(src("opt"), tmp_path)
  with open(f"{d}/config.json") as f:
    cfg = json.load(f)
  cfg["text_config"] = transformers.GPT2Config(n_embd=40, n_layer=1, n_head=4, vocab_size=120).to_dict()
  with open(f"{d}/config.json", "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match=r"text_config.model_type 'gpt2' is not supported"):
    blip2_jax.from_pretrained(d)


def test_truncated_and_corrupt_safetensors(src, tmp_path):
  d = _copy(src("opt"), tmp_path)
  path = f"{d}/model.safetensors"
  with open(path, "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(raw[:len(raw) - 1000])
  with pytest.raises(blip2_jax.CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
    blip2_jax.from_pretrained(d)
  with open(path, "wb") as f:
    f.write(raw[:4])
  with pytest.raises(blip2_jax.CheckpointError, match=r"model\.safetensors is not a readable safetensors"):
    blip2_jax.from_pretrained(d)
  with open(path, "wb") as f:  # a header length pointing past the end of the file
    f.write(np.uint64(10**6).tobytes() + raw[8:200])
  with pytest.raises(blip2_jax.CheckpointError, match=r"header length 1000000 does not fit"):
    blip2_jax.from_pretrained(d)
  # a header whose offsets disagree with shape x dtype (would otherwise fail in reshape later)
  n = int(np.frombuffer(raw[:8], np.uint64)[0])
  header = json.loads(raw[8:8 + n])
  key = next(k for k in header if k != "__metadata__")
  header[key]["shape"] = [int(np.prod(header[key]["shape"])) + 1]
  hb = json.dumps(header).encode()
  hb += b" " * (-len(hb) % 8)
  with open(path, "wb") as f:
    f.write(np.uint64(len(hb)).tobytes() + hb + raw[8 + n:])
  with pytest.raises(blip2_jax.CheckpointError, match=rf"corrupt: tensor '{key}'.*needs"):
    blip2_jax.from_pretrained(d)


class _CountingReader(io.DictReader):
  reads = 0

  def get(self, key):
    _CountingReader.reads += 1
    return super().get(key)


def test_all_mismatches_in_one_error_and_nothing_read(src, tmp_path):
  d = src("opt")
  model, params = blip2_jax.from_pretrained(d)
  t = _st_tensors(d)
  gone = "language_model.model.decoder.layers.1.fc1.weight"
  wrong = "qformer.encoder.layer.0.attention.attention.query.weight"
  del t[gone]
  t[wrong] = np.zeros((7, 32), np.float32)
  t["language_model.model.decoder.extra.weight"] = np.zeros(3, np.float32)
  bad = _copy(d, tmp_path)
  io.save_state_dict(bad, t)
  with pytest.raises(blip2_jax.CheckpointError) as e:
    blip2_jax.from_pretrained(bad)
  msg = str(e.value)
  assert bad in msg
  assert f"1 missing tensors:\n  {gone} (expected shape (72, 40))" in msg
  assert f"1 tensors with the wrong shape:\n  {wrong}: expected (32, 32), found (7, 32)" in msg
  assert "1 unexpected tensors (not used by this model):\n  language_model.model.decoder.extra.weight" in msg
  # strict validation happens before any tensor is read: no half-loaded model
  reader = _CountingReader(t, "<counting>")
  abstract = io.abstract_params(model, **blip2.dummy_inputs(model.config))
  with pytest.raises(blip2_jax.CheckpointError, match="<counting> does not match"):
    io.load_params(reader, blip2.hf_rules(model.config), abstract, ignore=blip2.hf_ignore(model.config))
  assert _CountingReader.reads == 0


def test_index_naming_missing_shard(src, tmp_path):
  d = src("opt")
  model, params = blip2_jax.from_pretrained(d)
  out = str(tmp_path / "sharded")
  blip2_jax.save_pretrained(model, params, out, max_shard_bytes=40_000)
  victim = sorted(f for f in os.listdir(out) if f.startswith("model-"))[1]
  os.remove(f"{out}/{victim}")
  with pytest.raises(blip2_jax.CheckpointError, match=rf"names shard files that do not exist: .*{victim}"):
    blip2_jax.from_pretrained(out)
  with open(f"{out}/{io.INDEX_NAME}", "w") as f:
    json.dump({"metadata": {}}, f)  # no weight_map
  with pytest.raises(blip2_jax.CheckpointError, match="not a readable safetensors index"):
    blip2_jax.from_pretrained(out)


def test_directory_without_weights(src, tmp_path):
  d = _copy(src("opt"), tmp_path)
  os.remove(f"{d}/model.safetensors")
  with pytest.raises(blip2_jax.CheckpointError, match="holds no model.safetensors"):
    blip2_jax.from_pretrained(d)
