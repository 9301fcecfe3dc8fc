"""Parity of blip2_jax.models.blip (BLIP's captioner and filter) against transformers 5.23
BlipForConditionalGeneration / BlipForImageTextRetrieval (eager, float32, CPU), loading, saving.

Tiny random checkpoints (`tiny.save_tiny_blip`: weights ~N(0, 0.2) moved off their init, so
outputs span several units). Measured max abs diffs are in the comments (CPU, jax 0.10.2, torch
2.13); the bounds are the project's float32 goal (tests/bounds.py)."""
import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

import blip2_jax
from blip2_jax.checkpoints import io, tiny
from blip2_jax.models import blip, registry, vit

from bounds import BF16_WEIGHTS_REL, assert_close

SEP, PAD = 3, 0


def _nchw(px):
  return torch.from_numpy(np.asarray(px)).permute(0, 3, 1, 2)


def _inputs(n=3, t=7, seed=0):
  """Pixels (n, 28, 28, 3) and texts with right padding (BERT's side) in rows 1.."""
  r = np.random.default_rng(seed)
  px = r.standard_normal((n, 28, 28, 3)).astype(np.float32)
  ids = r.integers(5, 98, (n, t)).astype(np.int64)
  ids[:, 0] = 2
  mask = np.ones((n, t), np.int64)
  for i in range(1, n):
    mask[i, t - 2 * i:] = 0
    ids[i, t - 2 * i:] = PAD
  return px, ids, mask


_JIT = {}


def _apply(model, method=None, **static):
  """jit-compiled `model.apply` per (model, method, static kwargs): one compile each."""
  key = (model, method, tuple(sorted(static.items())))
  if key not in _JIT:
    _JIT[key] = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method, **static))
  return _JIT[key]


def _load(path, **kw):
  model, params = blip2_jax.from_pretrained(path, **kw)
  return model, params


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint):
  d = tiny_checkpoint("BlipForConditionalGeneration", None)
  hf = T.BlipForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
  return (d, hf) + _load(d)


@pytest.fixture(scope="module")
def retriever(tiny_checkpoint):
  d = tiny_checkpoint("BlipForImageTextRetrieval", None)
  hf = T.BlipForImageTextRetrieval.from_pretrained(d, attn_implementation="eager").eval()
  return (d, hf) + _load(d)


def _caption_forward(model, params, px, ids, mask, labels):
  return _apply(model)(params, jnp.asarray(px), jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(labels))


def _labels(ids, mask):
  return np.where(mask == 1, ids, -100)


# ----------------------------------------------------------------------------------------
# config


def test_config_round_trip_and_unsupported_options(captioner, retriever):
  for d, hf, model, _ in (captioner, retriever):
    cfg = model.config
    assert blip.BlipConfig.from_hf(cfg.to_hf()) == cfg == blip.BlipConfig.from_hf(hf.config)
    assert cfg.vision.layer_norm_eps == 1e-5 and cfg.vision.qkv_bias and cfg.tie_word_embeddings
  assert registry.capabilities(captioner[2]) == {registry.CAPTION}
  assert registry.capabilities(retriever[2]) == {registry.ITC, registry.ITM}
  hf_cfg = tiny.tiny_blip_config()
  hf_cfg.architectures = ["BlipForQuestionAnswering"]
  with pytest.raises(ValueError, match="BlipForQuestionAnswering.*BlipForConditionalGeneration"):
    blip.BlipConfig.from_hf(hf_cfg)
  with pytest.raises(ValueError, match="text hidden_act='bogus'"):
    blip.BlipConfig.from_hf(tiny.tiny_blip_config(hidden_act="bogus"))
  with pytest.raises(ValueError, match="encoder_hidden_size 8 differs"):
    blip.BlipConfig(vit.VisionConfig(), blip.BlipTextConfig(encoder_hidden_size=8))
  # the top-level or the text flag ties the head, as transformers 5 does
  untied = tiny.tiny_blip_config(tie_word_embeddings=False)
  assert blip.BlipConfig.from_hf(untied).tie_word_embeddings  # top-level flag still set
  untied.tie_word_embeddings = False
  assert not blip.BlipConfig.from_hf(untied).tie_word_embeddings


# ----------------------------------------------------------------------------------------
# parity


def test_captioner_matches_hf(captioner):
  """Vision tower, decoder logits of a right-padded batch, LM loss (with label smoothing too)."""
  d, hf, model, params = captioner
  px, ids, mask = _inputs()
  labels = _labels(ids, mask)
  out = _caption_forward(model, params, px, ids, mask, labels)
  with torch.no_grad():
    ref = hf(pixel_values=_nchw(px), input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
             labels=torch.from_numpy(labels))
    vis = hf.vision_model(_nchw(px))
  # measured: vision last / pooler 1.9e-6 / 1.9e-6 (values to 5.3), logits 7.9e-6 (to 4.6), loss 4.8e-7
  assert_close(out["vision_outputs"]["last_hidden_state"], vis.last_hidden_state, "vision last_hidden_state")
  assert_close(out["vision_outputs"]["pooler_output"], vis.pooler_output, "vision pooler_output")
  assert_close(out["logits"], ref.logits, "decoder logits")
  assert_close(out["loss"], ref.loss, "LM loss")
  hf.text_decoder.label_smoothing = 0.1
  try:
    with torch.no_grad():
      smooth = hf(pixel_values=_nchw(px), input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  labels=torch.from_numpy(labels)).loss
  finally:
    hf.text_decoder.label_smoothing = 0.0
  assert_close(blip.lm_loss(out["logits"], labels, 0.1), smooth, "LM loss, label smoothing 0.1")  # 4.8e-7


def test_retrieval_matches_hf(retriever):
  """ITM logits (padded texts), the ITC cosine matrix, and ITM with several texts per image (each
  image's keys / values projected once) against HF on repeated images."""
  d, hf, model, params = retriever
  px, ids, mask = _inputs()

  def run(p, px, ids, mask):  # one compiled program for the three passes
    itm = model.apply({"params": p}, px, ids, mask, use_itm_head=True)
    itc = model.apply({"params": p}, px, ids, mask, use_itm_head=False)
    shared, _ = model.apply({"params": p}, itm["last_hidden_state"][:1], ids, mask, method="itm_logits")
    return itm, itc, shared
  itm, itc, shared = jax.jit(run)(params, jnp.asarray(px), jnp.asarray(ids), jnp.asarray(mask))
  pt = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  with torch.no_grad():
    ref_itm = hf(pixel_values=_nchw(px), use_itm_head=True, **pt)
    ref_itc = hf(pixel_values=_nchw(px), use_itm_head=False, **pt)
    ref_shared = hf(pixel_values=_nchw(px[[0, 0, 0]]), use_itm_head=True, **pt).itm_score
  # measured: ITM 1.0e-6 (logits to 2.9), question_embeds 1.7e-6 (to 4.1), ITC 1.5e-7 (cosines)
  assert_close(itm["itm_score"], ref_itm.itm_score, "ITM logits")
  assert_close(itm["question_embeds"], ref_itm.question_embeds, "ITM text encoder states")
  assert_close(itc["itm_score"], ref_itc.itm_score, "ITC cosines")
  assert itc["itm_score"].shape == (3, 3)
  assert_close(shared, ref_shared, "ITM, 3 texts sharing one image (its keys / values once)")  # 1.3e-6
  assert float(np.abs(np.asarray(ref_itm.itm_score)).max()) > 1.0  # the head is far from its init


def test_scan_remat_and_bf16(captioner):
  d, hf, model, params = captioner
  px, ids, mask = _inputs()
  labels = _labels(ids, mask)
  base = _caption_forward(model, params, px, ids, mask, labels)
  smodel, sparams = _load(d, scan=True, remat="full")
  assert "layers" in sparams["text_decoder"]["bert"]["encoder"]
  scanned = _caption_forward(smodel, sparams, px, ids, mask, labels)
  assert_close(scanned["logits"], base["logits"], "scan + remat vs unrolled")  # measured 0
  bmodel, bparams = _load(d, dtype=jnp.bfloat16)
  low = _caption_forward(bmodel, bparams, px, ids, mask, labels)
  assert low["logits"].dtype == jnp.bfloat16
  with torch.no_grad():
    ref = hf(pixel_values=_nchw(px), input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
  # measured 0.20 on logits up to 4.6 (bound 2^-4 x 4.6: bf16 weights and compute)
  assert_close(low["logits"].astype(jnp.float32), ref, "bf16 logits", rel=BF16_WEIGHTS_REL)


def test_options_interpolation_untied_head_and_save(tmp_path):
  """Non-default options: text gelu_new and eps 1e-6, vision quick_gelu and eps 1e-6, an untied LM
  head (its logits add HF's decoder.bias), positions interpolated for 42 px; then save -> HF."""
  hf_cfg = tiny.tiny_blip_config(hidden_act="gelu_new", layer_norm_eps=1e-6, tie_word_embeddings=False)
  hf_cfg.tie_word_embeddings = False
  hf_cfg.vision_config.hidden_act, hf_cfg.vision_config.layer_norm_eps = "quick_gelu", 1e-6
  torch.manual_seed(3)
  hf = tiny.perturb_(T.BlipForConditionalGeneration._from_config(hf_cfg, attn_implementation="eager").eval(), 3)
  head, emb = hf.text_decoder.cls.predictions, hf.text_decoder.bert.embeddings
  assert head.decoder.weight is not emb.word_embeddings.weight
  hf.save_pretrained(tmp_path / "hf")
  model, params = _load(str(tmp_path / "hf"))
  assert not model.config.tie_word_embeddings and "decoder" in params["text_decoder"]["cls"]
  r = np.random.default_rng(4)
  px = r.standard_normal((2, 42, 42, 3)).astype(np.float32)
  _, ids, mask = _inputs(2)
  out = _apply(model, interpolate_pos_encoding=True)(params, jnp.asarray(px), jnp.asarray(ids), jnp.asarray(mask))
  with torch.no_grad():
    ref = hf(pixel_values=_nchw(px), input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
             interpolate_pos_encoding=True)
  assert out["image_embeds"].shape == (2, 10, 44)
  # measured: image_embeds 1.7e-6 (to 4.0), logits 1.6e-6 (to 3.9)
  assert_close(out["image_embeds"], ref.image_embeds, "vision at 42 px (interpolated positions)")
  assert_close(out["logits"], ref.logits, "logits, untied head, gelu_new, eps 1e-6")
  blip2_jax.save_pretrained(model, params, str(tmp_path / "ours"))
  back = T.BlipForConditionalGeneration.from_pretrained(str(tmp_path / "ours"), attn_implementation="eager")
  # untied, HF's cls.predictions.bias is unused: we write the decoder bias there
  _assert_same_weights(back, hf, skip="text_decoder.cls.predictions.bias")
  with torch.no_grad():
    again = back(pixel_values=_nchw(px), input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 interpolate_pos_encoding=True).logits
  np.testing.assert_array_equal(again.numpy(), ref.logits.numpy())
  assert back.config.text_config.hidden_act == "gelu_new" and back.config.vision_config.hidden_act == "quick_gelu"


def test_text_encoder_without_cross_attention(tmp_path):
  """is_decoder=False: HF builds no cross-attention; ITC works and ITM is refused."""
  torch.manual_seed(5)
  hf = tiny.perturb_(T.BlipForImageTextRetrieval._from_config(tiny.tiny_blip_config(is_decoder=False),
                                                              attn_implementation="eager").eval(), 5)
  hf.save_pretrained(tmp_path)
  model, params = _load(str(tmp_path))
  assert "crossattention" not in params["text_encoder"]["encoder"]["layers_0"]
  px, ids, mask = _inputs(2)
  itc = _apply(model, use_itm_head=False)(params, jnp.asarray(px), jnp.asarray(ids), jnp.asarray(mask))
  with torch.no_grad():
    ref = hf(pixel_values=_nchw(px), input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
             use_itm_head=False).itm_score
  assert_close(itc["itm_score"], ref, "ITC without cross-attention")  # measured 1.6e-7
  with pytest.raises(ValueError, match="no cross-attention"):
    model.apply({"params": params}, itc["last_hidden_state"], jnp.asarray(ids), method="itm_logits")


# ----------------------------------------------------------------------------------------
# loading and saving


def _assert_same_weights(a, b, skip=None):
  sa, sb = a.state_dict(), b.state_dict()
  assert set(sa) == set(sb)
  for k in set(sa) - {skip}:
    np.testing.assert_array_equal(sa[k].numpy(), sb[k].numpy(), err_msg=k)


@pytest.mark.parametrize("which", ["captioner", "retriever"])
def test_save_pretrained_reloads_in_transformers(which, request, tmp_path):
  d, hf, model, params = request.getfixturevalue(which)
  blip2_jax.save_pretrained(model, params, str(tmp_path))
  cls = type(hf)
  back = cls.from_pretrained(str(tmp_path), attn_implementation="eager")
  _assert_same_weights(back, hf)  # the same tensors, hence the same outputs
  assert blip.BlipConfig.from_hf(back.config) == model.config
  again, params2 = _load(str(tmp_path))
  assert again.config == model.config
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(x, y)


def _rewrite(src, dst, drop=None, add=None):
  shutil.copytree(src, dst)
  reader = io.SafetensorsReader(os.path.join(dst, io.WEIGHTS_NAME))
  tensors = {k: np.array(reader.get(k)) for k in reader.keys() if k != drop}
  tensors.update(add or {})
  io.save_state_dict(dst, tensors)


def test_strict_loading_names_missing_and_unexpected(captioner, tmp_path):
  d = captioner[0]
  missing = "text_decoder.bert.encoder.layer.1.crossattention.self.key.weight"
  _rewrite(d, tmp_path / "a", drop=missing)
  with pytest.raises(io.CheckpointError, match=r"1 missing tensors:\n  " + missing.replace(".", r"\.")):
    blip2_jax.from_pretrained(str(tmp_path / "a"))
  _rewrite(d, tmp_path / "b", add={"text_decoder.bert.pooler.dense.weight": np.zeros((32, 32), np.float32)})
  with pytest.raises(io.CheckpointError, match=r"unexpected tensors.*\n  text_decoder\.bert\.pooler\.dense"):
    blip2_jax.from_pretrained(str(tmp_path / "b"))
  # what transformers 4 wrote besides: the tied head copies and the position_ids buffer load
  reader = io.SafetensorsReader(os.path.join(d, io.WEIGHTS_NAME))
  emb = reader.get("text_decoder.bert.embeddings.word_embeddings.weight")
  _rewrite(d, tmp_path / "c", add={"text_decoder.cls.predictions.decoder.weight": np.array(emb),
                                    "text_decoder.cls.predictions.decoder.bias": np.zeros(100, np.float32),
                                    "text_decoder.bert.embeddings.position_ids": np.arange(40)[None]})
  blip2_jax.from_pretrained(str(tmp_path / "c"))


def test_not_a_blip_checkpoint_is_named(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "clip_x"}')
  with pytest.raises(io.CheckpointError, match="'clip_x' checkpoint.*BLIP-2 / InstructBLIP / BLIP"):
    blip2_jax.from_pretrained(str(tmp_path))


def test_runtime_replace_keeps_the_model(captioner):
  cfg = captioner[2].config
  r = cfg.replace_runtime(dtype="bfloat16", scan=True)
  assert r.text.dtype == r.vision.dtype == "bfloat16" and r.text.scan
  assert dataclasses.replace(r, vision=cfg.vision, text=cfg.text) == cfg
