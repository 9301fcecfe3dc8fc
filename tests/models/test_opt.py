"""OPT parity against HF transformers (eager attention, float32, tiny random models)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from blip2_jax.checkpoints import io
from blip2_jax.models import layers as L
from blip2_jax.models import opt

from bounds import BF16_WEIGHTS_REL, assert_close

VOCAB, T = 128, 9


def make_hf(**kw):
  """Tiny random HF OPT with weights rescaled so logits are O(1) and norms/biases != 1/0."""
  torch.manual_seed(0)
  base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
              num_attention_heads=4, max_position_embeddings=64, attn_implementation="eager")
  base.update(kw)
  m = transformers.OPTForCausalLM(transformers.OPTConfig(**base)).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if p.ndim == 1:  # norm weights around 1, biases around 0
        p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name and "weight" in name else 0.0))
      else:  # linears (out, in) and embedding tables (n, d): std 1/sqrt(last dim)
        p.normal_(0.0, p.shape[1] ** -0.5)
  return m


def load(m, tmp_path, **runtime):
  m.save_pretrained(tmp_path)
  cfg = opt.OPTConfig.from_hf(m.config, **runtime)
  ids = jnp.zeros((1, 4), jnp.int32)
  params = io.load_params(str(tmp_path), opt.hf_rules(cfg),
                          io.abstract_params(opt.OPTForCausalLM(cfg), ids), ignore=opt.hf_ignore(cfg))
  return cfg, params


def batch(padded=True, seed=1):
  """Batch 2: row 0 LEFT-padded by 3, row 1 RIGHT-padded by 2 (or no padding)."""
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(3, VOCAB, (2, T), generator=g)
  mask = torch.ones(2, T, dtype=torch.long)
  if padded:
    mask[0, :3] = 0
    mask[1, -2:] = 0
  ids = ids.masked_fill(mask == 0, 1)  # pad id
  return ids, mask


def hf_logits(m, ids=None, mask=None, **kw):
  with torch.no_grad():
    return m(input_ids=ids, attention_mask=mask, **kw).logits.numpy()


def jx(x):
  return None if x is None else jnp.asarray(x.numpy())


def run(cfg, params, ids=None, mask=None, **kw):
  out = opt.OPTForCausalLM(cfg).apply({"params": params}, jx(ids), jx(mask), **kw)
  return np.asarray(out["logits"], np.float32)


CASES = {
    "default": {},
    "post_ln": {"do_layer_norm_before": False},
    "proj_dim": {"word_embed_proj_dim": 24},
    "opt350m_like": {"do_layer_norm_before": False, "word_embed_proj_dim": 24},
    "no_bias": {"enable_bias": False},
    "untied": {"tie_word_embeddings": False},
    "gelu": {"activation_function": "gelu"},
    "no_affine": {"layer_norm_elementwise_affine": False},
    "remove_final_ln": {"_remove_final_layer_norm": True},
    "head_dim_9": {"hidden_size": 36, "ffn_dim": 40},
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, tmp_path):
  m = make_hf(**CASES[case])
  cfg, params = load(m, tmp_path)
  ids, mask = batch()
  ref = hf_logits(m, ids, mask)
  out = run(cfg, params, ids, mask)
  assert np.abs(ref).max() > 0.5  # values of order 1
  # All positions, padded ones included (fully masked rows average V in both). Measured
  # max abs diff: 0.95e-6 (head_dim_9) .. 1.9e-6 (proj_dim, remove_final_ln), logits up to 7.4.
  assert_close(out, ref)


def test_no_mask_and_explicit_positions(tmp_path):
  m = make_hf()
  cfg, params = load(m, tmp_path)
  ids, _ = batch(padded=False)
  # measured 1.4e-6 (no mask), 1.2e-6 (explicit position_ids)
  assert_close(run(cfg, params, ids), hf_logits(m, ids))
  pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [5, 6, 7, 8, 9, 10, 11, 12, 13]])
  ref = hf_logits(m, ids, position_ids=pos)
  assert_close(run(cfg, params, ids, position_ids=jx(pos)), ref)


def test_left_padding_shifts_positions():
  pos = opt.position_ids_from_mask(jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]]))
  np.testing.assert_array_equal(pos, [[-1, -1, 0, 1, 2], [0, 1, 2, 3, -1]])


class Composite(nn.Module):
  """What BLIP-2 does: embed text, prepend query embeddings, run the LM on embeddings."""
  config: opt.OPTConfig

  @nn.compact
  def __call__(self, queries, ids, mask):
    lm = opt.OPTForCausalLM(self.config, name="language_model")
    e = lm.embed_tokens(ids)
    full = jnp.concatenate([jnp.ones(queries.shape[:2], mask.dtype), mask], axis=1)
    return e, lm(inputs_embeds=jnp.concatenate([queries, e], axis=1), attention_mask=full)


@pytest.mark.parametrize("case", ["default", "opt350m_like"])
def test_inputs_embeds_path(case, tmp_path):
  m = make_hf(**CASES[case])
  cfg, params = load(m, tmp_path)
  ids, mask = batch()
  lm = opt.OPTForCausalLM(cfg)
  by_ids = lm.apply({"params": params}, jx(ids), jx(mask))
  e = lm.apply({"params": params}, jx(ids), method="embed_tokens")
  with torch.no_grad():
    hf_e = m.get_input_embeddings()(ids).numpy()
  np.testing.assert_array_equal(np.asarray(e), hf_e)
  by_emb = lm.apply({"params": params}, inputs_embeds=e, attention_mask=jx(mask))
  np.testing.assert_array_equal(np.asarray(by_emb["logits"]), np.asarray(by_ids["logits"]))

  # Composite with 4 prepended query embeddings vs HF inputs_embeds; both methods on one
  # instance inside a compact module, params under "language_model".
  q = np.random.default_rng(0).normal(size=(2, 4, cfg.word_embed_proj_dim)).astype(np.float32)
  comp = Composite(cfg)
  abstract = io.abstract_params(comp, jnp.asarray(q), jx(ids), jx(mask))
  assert set(nn.unbox(abstract)) == {"language_model"}
  e2, out = comp.apply({"params": {"language_model": params}}, jnp.asarray(q), jx(ids), jx(mask))
  np.testing.assert_array_equal(np.asarray(e2), hf_e)
  full = torch.cat([torch.ones(2, 4, dtype=torch.long), mask], 1)
  with torch.no_grad():
    ref = m(inputs_embeds=torch.cat([torch.from_numpy(q), torch.from_numpy(hf_e)], 1),
            attention_mask=full).logits.numpy()
  # measured 1.1e-6 (default), 1.9e-6 (opt350m_like)
  assert_close(np.asarray(out["logits"]), ref)
  assert out["last_hidden_state"].shape == (2, 4 + T, cfg.word_embed_proj_dim)


def test_scan_matches_unrolled(tmp_path):
  m = make_hf(do_layer_norm_before=False, word_embed_proj_dim=24)
  cfg, params = load(m, tmp_path)
  ids, mask = batch()
  ref = run(cfg, params, ids, mask)
  scfg = dataclasses.replace(cfg, scan=True, remat="full")
  sparams = L.unrolled_to_scan(params)
  # Not bit-identical on CPU (XLA fuses the scan body differently): measured 1.2e-6.
  assert_close(run(scfg, sparams, ids, mask), ref)
  # Loading straight into the scanned tree gives the same stacked leaves.
  direct = io.load_params(str(tmp_path), opt.hf_rules(scfg),
                          io.abstract_params(opt.OPTForCausalLM(scfg), jx(ids)))
  jax.tree.map(np.testing.assert_array_equal, direct, sparams)
  np.testing.assert_array_equal(L.scan_to_unrolled(sparams)["model"]["decoder"]["layers_1"]["fc1"]["kernel"],
                                params["model"]["decoder"]["layers_1"]["fc1"]["kernel"])


def test_bfloat16(tmp_path):
  m = make_hf()
  cfg, params = load(m, tmp_path, dtype="bfloat16", param_dtype="bfloat16")
  ids, mask = batch()
  ref = hf_logits(m, ids, mask)
  out = run(cfg, params, ids, mask)
  keep = mask.numpy().astype(bool)
  # bf16 weights and activations vs fp32 torch: measured max abs diff 0.040 (logits up to 3.5).
  assert_close(out[keep], ref[keep], "bf16 logits", rel=BF16_WEIGHTS_REL)


def test_dropout_training_mode(tmp_path):
  m = make_hf()
  cfg, params = load(m, tmp_path)
  ids, mask = batch()
  cfg = dataclasses.replace(cfg, scan=True, remat="dots")
  params = L.unrolled_to_scan(params)
  lm = opt.OPTForCausalLM(cfg)
  det = lm.apply({"params": params}, jx(ids), jx(mask))["logits"]
  train = lm.apply({"params": params}, jx(ids), jx(mask), deterministic=False,
                   rngs={"dropout": jax.random.PRNGKey(0)})["logits"]
  assert np.isfinite(np.asarray(train)).all() and np.abs(np.asarray(train - det)).max() > 1e-3


def test_state_dict_round_trip_and_strict_loading(tmp_path):
  m = make_hf(tie_word_embeddings=False, word_embed_proj_dim=24)
  cfg, params = load(m, tmp_path)
  sd = io.to_state_dict(params, opt.hf_rules(cfg))
  hf_sd = {k: v.numpy() for k, v in m.state_dict().items()}
  assert set(sd) == set(hf_sd)
  for k in sd:
    np.testing.assert_array_equal(sd[k], hf_sd[k])

  abstract = io.abstract_params(opt.OPTForCausalLM(cfg), jnp.zeros((1, 4), jnp.int32))
  broken = dict(hf_sd)
  del broken["model.decoder.layers.1.fc2.weight"]
  broken["model.decoder.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(io.CheckpointError) as e:
    io.load_params(io.DictReader(broken), opt.hf_rules(cfg), abstract, ignore=opt.hf_ignore(cfg))
  assert "model.decoder.layers.1.fc2.weight" in str(e.value)
  assert "model.decoder.extra.weight" in str(e.value)


def test_config_round_trip_and_errors():
  hf = transformers.OPTConfig(vocab_size=100, hidden_size=32, num_attention_heads=4,
                              do_layer_norm_before=False, word_embed_proj_dim=16,
                              tie_word_embeddings=False, _remove_final_layer_norm=True)
  cfg = opt.OPTConfig.from_hf(hf, dtype="bfloat16", scan=True)
  assert cfg.word_embed_proj_dim == 16 and cfg.remove_final_layer_norm and cfg.scan
  assert opt.OPTConfig.from_hf(cfg.to_hf(), dtype="bfloat16", scan=True) == cfg
  assert opt.OPTConfig.from_hf(hf.to_dict()) == opt.OPTConfig.from_hf(hf)
  with pytest.raises(ValueError, match="activation_function"):
    opt.OPTConfig.from_hf({**hf.to_dict(), "activation_function": "nope"})
  with pytest.raises(ValueError, match="model_type"):
    opt.OPTConfig.from_hf(transformers.LlamaConfig())
