"""blip2_jax.generate end to end against transformers generate (tiny OPT and T5 checkpoints)."""
import numpy as np
import pytest
import torch
import transformers

import blip2_jax
from blip2_jax.checkpoints import tiny


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
  made = {}

  def get(family):
    if family not in made:
      d = tiny_checkpoint("Blip2ForConditionalGeneration", family)
      made[family] = (d, *blip2_jax.from_pretrained(d),
                      transformers.Blip2ForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval())
    return made[family]
  return get


def _compare(ckpt, family, **opts):
  d, model, params, hf = ckpt(family)
  cfg = model.config
  rng = np.random.default_rng(0)
  px = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
  ids = rng.integers(4, 100, (2, 3)).astype(np.int32)
  ours = np.asarray(blip2_jax.generate(model, params, px, ids, np.ones_like(ids), **opts))
  q = cfg.num_query_tokens
  t_ids = torch.from_numpy(ids).long()
  img = torch.full((2, q), cfg.image_token_index, dtype=torch.long)
  with torch.no_grad():
    ref = hf.generate(pixel_values=torch.from_numpy(px).permute(0, 3, 1, 2), input_ids=torch.cat([img, t_ids], 1),
                      attention_mask=torch.ones(2, q + 3, dtype=torch.long), do_sample=False, **opts).numpy()
  ref = ref[:, 1:] if cfg.is_encoder_decoder else ref[:, q + 3:]  # new tokens only
  eos = cfg.text.eos_token_id
  for o, r in zip(ours, ref):  # equal up to and including EOS (the fill after it is ours: pad)
    n = next((i + 1 for i, t in enumerate(r) if t == eos), len(r))
    np.testing.assert_array_equal(o[:n], r[:n])
  return model, params, px, ids


@pytest.mark.parametrize("family,beams", [("opt", 1), ("opt", 3), ("t5", 3), ("llama", 1)])
def test_generate_matches_hf(ckpt, family, beams):
  model, params, px, ids = _compare(ckpt, family, max_new_tokens=6, num_beams=beams)
  # same shapes again: no new compile
  from blip2_jax import inference
  before = inference.generation._generate_fn.cache_info().misses
  blip2_jax.generate(model, params, px, ids, np.ones_like(ids), max_new_tokens=6, num_beams=beams)
  assert inference.generation._generate_fn.cache_info().misses == before


# Every family with the options of the issue: beams 3 / 5, length_penalty -1 / 0 / 1, min_new_tokens,
# repetition_penalty, no_repeat_ngram_size (the search alone is checked far more widely in
# tests/decoding/test_search.py; this runs them through each real LLM and its cache).
MODES = [dict(num_beams=5, length_penalty=-1.0, min_new_tokens=3, max_new_tokens=6),
         dict(num_beams=3, length_penalty=0.0, repetition_penalty=1.3, no_repeat_ngram_size=2, max_new_tokens=6),
         dict(num_beams=1, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=2, max_new_tokens=6)]


@pytest.mark.parametrize("family", ["opt", "t5", "llama"])
@pytest.mark.parametrize("mode", range(len(MODES)))
def test_generate_modes_match_hf(ckpt, family, mode):
  _compare(ckpt, family, **MODES[mode])


def test_generate_rejects_retrieval_checkpoint(tmp_path):
  d = tiny.save_tiny(str(tmp_path), "Blip2ForImageTextRetrieval")
  model, params = blip2_jax.from_pretrained(d)
  with pytest.raises(TypeError, match="needs a checkpoint with a language model"):
    blip2_jax.generate(model, params, np.zeros((1, 28, 28, 3), np.float32))
