"""What the parity tests of the decoder-only families share (tests/models/test_{qwen2,qwen3,mistral,
gemma}.py): a tiny random HF model with every weight moved off its init, our model loaded strictly
from its save_pretrained directory, and the checks (full-pass logits with padding, cached decoding
and generation against HF `generate`, scan vs unrolled, strict loading).

Generation: `decoding.steps.lm_prefill` + the jitted step (greedy, per-step logits against HF's
`output_logits`) and `decoding.search.search` (beam), on a batch whose second row is left-padded,
with a prompt longer than the sliding windows of the configs that have them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from blip2_jax.checkpoints import io
from blip2_jax.decoding import search, steps
from blip2_jax.models import layers as L
from blip2_jax.models import registry

from bounds import BF16_WEIGHTS_REL, assert_close  # noqa: F401 (BF16_WEIGHTS_REL: for the test files)

VOCAB, T = 128, 11
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
            attn_implementation="eager")


def make_hf(model_cls: str, config_cls: str, gemma_norms: bool = False, **kw):
  """Tiny random HF model: norm weights around 1 (around 0 for Gemma's (1 + w) norms), biases around
  0, matrices std 1/sqrt(fan-in), so logits are O(1) and every weight counts."""
  torch.manual_seed(0)
  cfg = getattr(transformers, config_cls)(**{**BASE, **kw})
  m = getattr(transformers, model_cls)(cfg).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if p.ndim == 1:
        p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name and not gemma_norms else 0.0))
      else:
        p.normal_(0.0, p.shape[1] ** -0.5)
  return m


def build(model_cls: str, config_cls: str, family: str, options: dict, path, **runtime):
  """-> (HF model, our lm module, params): `make_hf` with `options`, then `load`."""
  m = make_hf(model_cls, config_cls, gemma_norms=family.startswith("gemma"), **options)
  return (m,) + load(m, path, family, **runtime)


def load(m, path, family: str, **runtime):
  """save_pretrained -> our config (from_hf) and params (strict load) -> (lm module, params)."""
  m.save_pretrained(path)
  fam = registry.family(family)
  cfg = fam.config_cls.from_hf(m.config, **runtime)
  assert fam.config_cls.from_hf(cfg.to_hf(), **runtime) == cfg  # config round trip
  lm = fam.lm_cls(cfg)
  params = io.load_params(str(path), fam.hf_rules(cfg), io.abstract_params(lm, jnp.zeros((1, 4), jnp.int32)),
                          ignore=fam.hf_ignore(cfg))
  return lm, params


def batch(seed=1, t=T):
  """Batch 2: row 0 LEFT-padded by 3, row 1 RIGHT-padded by 2."""
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(3, VOCAB, (2, t), generator=g)
  mask = torch.ones(2, t, dtype=torch.long)
  mask[0, :3] = 0
  mask[1, -2:] = 0
  return ids.masked_fill(mask == 0, 0), mask


def logits(lm, params, ids, mask, **kw):
  out = jax.jit(lambda p, i, a: lm.apply({"params": p}, i, a, **kw))(params, jnp.asarray(ids.numpy()),
                                                                      jnp.asarray(mask.numpy()))
  return np.asarray(out["logits"], np.float32)


def check_logits(m, lm, params) -> float:
  """Full pass, every position (padded ones too: HF's dtype-min masks and ours agree there)."""
  ids, mask = batch()
  with torch.no_grad():
    ref = m(input_ids=ids, attention_mask=mask).logits.numpy()
  assert np.abs(ref).max() > 0.5  # values of order 1
  return assert_close(logits(lm, params, ids, mask), ref, "logits")


def _prompt():
  """Row 1 left-padded by 3 (HF generate's layout for a decoder-only LLM)."""
  g = torch.Generator().manual_seed(5)
  ids = torch.randint(3, VOCAB, (2, 9), generator=g)
  mask = torch.ones_like(ids)
  mask[1, :3] = 0
  return ids.masked_fill(mask == 0, 0), mask


def check_generation(m, lm, params, n_new: int = 6) -> float:
  """Greedy: tokens equal HF generate's and the cached step logits equal its output_logits (so
  the cache and the windows over it agree with HF's); beam search (3 beams): HF's best beam.
  Returns the largest step-logit difference."""
  cfg = lm.config
  eos = cfg.eos_token_id
  stops = set(eos) if isinstance(eos, tuple) else {eos}
  ids, mask = _prompt()
  with torch.no_grad():
    ref = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                     num_beams=1, return_dict_in_generate=True, output_logits=True)
  ref_tokens = ref.sequences[:, ids.shape[1]:].numpy()
  ref_logits = np.stack([x.numpy() for x in ref.logits], 1)

  def prefill(p, i, a):
    first, state, _, _, _ = steps.lm_prefill(lm, p, i, a, max_new_tokens=n_new)
    return first, state
  first, state = jax.jit(prefill)(params, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
  step = jax.jit(lambda p, s, t: steps.make_step_fn(lm, p)(s, t))
  out, logit = [], first
  for i in range(ref_tokens.shape[1]):
    out.append(np.asarray(logit))
    if i + 1 < ref_tokens.shape[1]:  # fed HF's tokens (pad after EOS too), so logits stay comparable
      logit, state = step(params, state, jnp.asarray(ref_tokens[:, i], jnp.int32))
  ours = np.stack(out, 1)
  for o, r in zip(ours.argmax(-1), ref_tokens):  # greedy picks HF's tokens, up to EOS
    n = next((i + 1 for i, t in enumerate(r) if t in stops), len(r))
    np.testing.assert_array_equal(o[:n], r[:n])
  d = assert_close(ours, ref_logits, "cached step logits vs HF output_logits")

  with torch.no_grad():
    beam = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                      num_beams=3).numpy()[:, ids.shape[1]:]

  def run(p, i, a):
    first, state, step_fn, ctx, ctx_mask = steps.lm_prefill(lm, p, i, a, max_new_tokens=n_new)
    return search.search(step_fn, state, first, ctx, ctx_mask, max_new_tokens=n_new, num_beams=3,
                         eos_token_id=eos, pad_token_id=cfg.pad_token_id)
  got = np.asarray(jax.jit(run)(params, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())))
  for o, r in zip(got, beam):  # up to and including EOS (the fill after it differs by design)
    n = next((i + 1 for i, t in enumerate(r) if t in stops), len(r))
    np.testing.assert_array_equal(o[:n], r[:n])
  return d


def check_scan(lm, params, path) -> float:
  """Scanned (+ remat) == unrolled, and a scanned model loads straight from the directory."""
  ids, mask = batch()
  ref = logits(lm, params, ids, mask)
  fam = registry.family(lm.config)
  scfg = dataclasses.replace(lm.config, scan=True, remat="full")
  slm = fam.lm_cls(scfg)
  sparams = L.unrolled_to_scan(params)
  d = assert_close(logits(slm, sparams, ids, mask), ref, "scanned logits")
  direct = io.load_params(str(path), fam.hf_rules(scfg), io.abstract_params(slm, jnp.zeros((1, 4), jnp.int32)),
                          ignore=fam.hf_ignore(scfg))
  jax.tree.map(np.testing.assert_array_equal, direct, sparams)
  return d


def check_strict_loading(m, lm, params, drop: str, reshape: str) -> None:
  """Our state dict == HF's, key for key; a missing and a mis-shaped tensor both fail, by name."""
  fam = registry.family(lm.config)
  sd = io.to_state_dict(params, fam.hf_rules(lm.config))
  hf_sd = {k: v.numpy() for k, v in m.state_dict().items()}
  if lm.config.tie_word_embeddings:
    hf_sd.pop("lm_head.weight", None)  # the tied copy
  assert set(sd) == set(hf_sd)
  for k in sd:
    np.testing.assert_array_equal(sd[k], hf_sd[k])
  broken = dict(hf_sd)
  del broken[drop]
  broken[reshape] = np.zeros((3, 3), np.float32)
  abstract = io.abstract_params(lm, jnp.zeros((1, 4), jnp.int32))
  try:
    io.load_params(io.DictReader(broken), fam.hf_rules(lm.config), abstract, ignore=fam.hf_ignore(lm.config))
  except io.CheckpointError as e:
    assert drop in str(e) and reshape in str(e), str(e)
  else:
    raise AssertionError("a broken checkpoint loaded")
