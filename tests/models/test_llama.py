"""LLaMA parity against HF transformers (eager attention, float32, tiny random models)."""
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
from blip2_jax.models import llama

from bounds import BF16_WEIGHTS_REL, assert_close

VOCAB, T = 128, 11
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def make_hf(**kw):
  """Tiny random HF LLaMA with weights rescaled so logits are O(1) and norms/biases != 1/0."""
  torch.manual_seed(0)
  base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
              attn_implementation="eager")
  base.update(kw)
  m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base)).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if p.ndim == 1:  # norm weights around 1, biases around 0
        p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
      else:  # linears (out, in) and the embedding table (n, d): std 1/sqrt(last dim)
        p.normal_(0.0, p.shape[1] ** -0.5)
  return m


def load(m, tmp_path, **runtime):
  m.save_pretrained(tmp_path)
  cfg = llama.LlamaConfig.from_hf(m.config, **runtime)
  ids = jnp.zeros((1, 4), jnp.int32)
  params = io.load_params(str(tmp_path), llama.hf_rules(cfg),
                          io.abstract_params(llama.LlamaForCausalLM(cfg), ids),
                          ignore=llama.hf_ignore(cfg))
  return cfg, params


def batch(padded=True, seed=1):
  """Batch 2: row 0 LEFT-padded by 3, row 1 RIGHT-padded by 2 (or no padding)."""
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(3, VOCAB, (2, T), generator=g)
  mask = torch.ones(2, T, dtype=torch.long)
  if padded:
    mask[0, :3] = 0
    mask[1, -2:] = 0
  ids = ids.masked_fill(mask == 0, 0)
  return ids, mask


def hf_logits(m, ids=None, mask=None, **kw):
  with torch.no_grad():
    return m(input_ids=ids, attention_mask=mask, **kw).logits.numpy()


def jx(x):
  return None if x is None else jnp.asarray(x.numpy())


def run(cfg, params, ids=None, mask=None, **kw):
  out = llama.LlamaForCausalLM(cfg).apply({"params": params}, jx(ids), jx(mask), **kw)
  return np.asarray(out["logits"], np.float32)


CASES = {
    "default": {},
    "gqa": {"num_key_value_heads": 2},
    "mqa": {"num_key_value_heads": 1},
    "head_dim_12": {"head_dim": 12},  # 4 x 12 != 64
    "rope_llama3": {"rope_parameters": LLAMA3},
    "rope_linear": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}},
    "attention_bias": {"attention_bias": True},
    "mlp_bias": {"mlp_bias": True},
    "tied": {"tie_word_embeddings": True},
    "gelu": {"hidden_act": "gelu"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, tmp_path):
  m = make_hf(**CASES[case])
  cfg, params = load(m, tmp_path)
  ids, mask = batch()
  ref = hf_logits(m, ids, mask)
  out = run(cfg, params, ids, mask)
  assert np.abs(ref).max() > 0.5  # values of order 1
  # All positions, padded ones included; HF uses arange positions even with left padding.
  # Measured max abs diff: 1.5e-6 (default) .. 3.4e-6 (gqa); mqa 3.0e-6, attention_bias 2.4e-6,
  # head_dim_12 2.2e-6, llama3 2.1e-6 (logits up to ~4.2).
  assert_close(out, ref)


@pytest.mark.parametrize("case", ["default", "rope_llama3", "head_dim_12"])
def test_rope_inv_freq_matches_hf(case):
  m = make_hf(**CASES[case])
  cfg = llama.LlamaConfig.from_hf(m.config)
  ref = m.model.rotary_emb.inv_freq.numpy()
  # measured: 0 (default), <= 1 ulp elsewhere (torch's float32 pow is not correctly rounded)
  np.testing.assert_allclose(llama.rope_inv_freq(cfg), ref, rtol=1e-5, atol=0)  # tests/bounds.py REL
  assert m.model.rotary_emb.attention_scaling == 1.0


def test_explicit_position_ids_and_no_mask(tmp_path):
  m = make_hf(num_key_value_heads=2)
  cfg, params = load(m, tmp_path)
  ids, mask = batch()
  pos = (mask.cumsum(1) - 1).clamp(min=0)  # padding-aware positions, a caller's choice
  ref = hf_logits(m, ids, mask, position_ids=pos)
  # measured 3.4e-6 for all three calls
  assert_close(run(cfg, params, ids, mask, position_ids=jx(pos)), ref)
  ids, _ = batch(padded=False)
  assert_close(run(cfg, params, ids), hf_logits(m, ids))
  pos1 = torch.arange(3, 3 + T)[None]  # (1, T) broadcast over the batch
  assert_close(run(cfg, params, ids, position_ids=jx(pos1)), hf_logits(m, ids, position_ids=pos1))


class Composite(nn.Module):
  """What BLIP-2 / InstructBLIP do: embed text, prepend query embeddings, run on embeddings."""
  config: llama.LlamaConfig

  @nn.compact
  def __call__(self, queries, ids, mask):
    lm = llama.LlamaForCausalLM(self.config, name="language_model")
    e = lm.embed_tokens(ids)
    full = jnp.concatenate([jnp.ones(queries.shape[:2], mask.dtype), mask], axis=1)
    return e, lm(inputs_embeds=jnp.concatenate([queries, e], axis=1), attention_mask=full)


def test_inputs_embeds_path(tmp_path):
  m = make_hf(num_key_value_heads=2)
  cfg, params = load(m, tmp_path)
  ids, mask = batch()
  lm = llama.LlamaForCausalLM(cfg)
  by_ids = lm.apply({"params": params}, jx(ids), jx(mask))
  e = lm.apply({"params": params}, jx(ids), method="embed_tokens")
  with torch.no_grad():
    hf_e = m.get_input_embeddings()(ids).numpy()
  np.testing.assert_array_equal(np.asarray(e), hf_e)
  by_emb = lm.apply({"params": params}, inputs_embeds=e, attention_mask=jx(mask))
  np.testing.assert_array_equal(np.asarray(by_emb["logits"]), np.asarray(by_ids["logits"]))

  q = np.random.default_rng(0).normal(size=(2, 4, cfg.hidden_size)).astype(np.float32)
  comp = Composite(cfg)
  abstract = io.abstract_params(comp, jnp.asarray(q), jx(ids), jx(mask))
  assert set(nn.unbox(abstract)) == {"language_model"}
  e2, out = comp.apply({"params": {"language_model": params}}, jnp.asarray(q), jx(ids), jx(mask))
  np.testing.assert_array_equal(np.asarray(e2), hf_e)
  full = torch.cat([torch.ones(2, 4, dtype=torch.long), mask], 1)
  with torch.no_grad():
    ref = m(inputs_embeds=torch.cat([torch.from_numpy(q), torch.from_numpy(hf_e)], 1),
            attention_mask=full).logits.numpy()
  # measured 2.9e-6
  assert_close(np.asarray(out["logits"]), ref)
  assert out["last_hidden_state"].shape == (2, 4 + T, cfg.hidden_size)


def test_embeds_only_init_creates_embedding():
  cfg = llama.LlamaConfig.from_hf(make_hf().config)
  abstract = io.abstract_params(llama.LlamaForCausalLM(cfg),
                                inputs_embeds=jnp.zeros((1, 3, cfg.hidden_size)))
  assert "embed_tokens" in nn.unbox(abstract)["model"]


def test_scan_matches_unrolled(tmp_path):
  m = make_hf(num_key_value_heads=2, rope_parameters=LLAMA3)
  cfg, params = load(m, tmp_path)
  ids, mask = batch()
  ref = run(cfg, params, ids, mask)
  scfg = dataclasses.replace(cfg, scan=True, remat="full")
  sparams = L.unrolled_to_scan(params)
  # Not bit-identical on CPU (XLA fuses the scan body differently): measured 1.9e-6.
  assert_close(run(scfg, sparams, ids, mask), ref)
  direct = io.load_params(str(tmp_path), llama.hf_rules(scfg),
                          io.abstract_params(llama.LlamaForCausalLM(scfg), jx(ids)))
  jax.tree.map(np.testing.assert_array_equal, direct, sparams)


def test_bfloat16(tmp_path):
  m = make_hf(num_key_value_heads=2)
  cfg, params = load(m, tmp_path, dtype="bfloat16", param_dtype="bfloat16")
  ids, mask = batch()
  ref = hf_logits(m, ids, mask)
  out = run(cfg, params, ids, mask)
  keep = mask.numpy().astype(bool)
  # bf16 weights and activations vs fp32 torch: measured max abs diff 0.072 (logits up to 3.6).
  assert_close(out[keep], ref[keep], "bf16 logits", rel=BF16_WEIGHTS_REL)


def test_state_dict_round_trip_and_strict_loading(tmp_path):
  m = make_hf(num_key_value_heads=2, attention_bias=True, mlp_bias=True)
  cfg, params = load(m, tmp_path)
  sd = io.to_state_dict(params, llama.hf_rules(cfg))
  hf_sd = {k: v.numpy() for k, v in m.state_dict().items()}
  assert set(sd) == set(hf_sd)
  for k in sd:
    np.testing.assert_array_equal(sd[k], hf_sd[k])

  abstract = io.abstract_params(llama.LlamaForCausalLM(cfg), jnp.zeros((1, 4), jnp.int32))
  broken = dict(hf_sd)
  del broken["model.layers.0.self_attn.k_proj.bias"]
  broken["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
  with pytest.raises(io.CheckpointError) as e:
    io.load_params(io.DictReader(broken), llama.hf_rules(cfg), abstract, ignore=llama.hf_ignore(cfg))
  assert "model.layers.0.self_attn.k_proj.bias" in str(e.value)
  assert "model.layers.1.mlp.up_proj.weight" in str(e.value)


def test_config_round_trip_and_errors():
  hf = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=24, rope_parameters=LLAMA3,
                                tie_word_embeddings=True, eos_token_id=[2, 3])
  cfg = llama.LlamaConfig.from_hf(hf, dtype="bfloat16")
  assert (cfg.rope_type, cfg.rope_factor, cfg.head_dim) == ("llama3", 8.0, 24)
  assert llama.LlamaConfig.from_hf(cfg.to_hf(), dtype="bfloat16") == cfg
  assert llama.LlamaConfig.from_hf(hf.to_dict()) == llama.LlamaConfig.from_hf(hf)
  legacy = transformers.LlamaConfig(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0})
  assert llama.LlamaConfig.from_hf(legacy).rope_factor == 4.0
  with pytest.raises(ValueError, match="rope_type 'dynamic'"):
    llama.LlamaConfig.from_hf(transformers.LlamaConfig(
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}))
  with pytest.raises(ValueError, match="hidden_act"):
    llama.LlamaConfig.from_hf({**transformers.LlamaConfig().to_dict(), "hidden_act": "nope"})
