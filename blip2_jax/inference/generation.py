"""`generate`: prefill + search as one compiled program per model, options and shapes."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from blip2_jax.core import xla
from blip2_jax.decoding import search, steps
from blip2_jax.models import registry

_GEN_DEFAULTS = dict(max_new_tokens=30, min_new_tokens=0, num_beams=1, do_sample=False, temperature=1.0,
                     top_k=0, top_p=1.0, length_penalty=1.0, repetition_penalty=1.0,
                     no_repeat_ngram_size=0, eos_token_id=None, pad_token_id=None)


@functools.lru_cache(maxsize=32)
def _generate_fn(model, opts: tuple):
  o = dict(opts)

  def run(params, pixel_values, input_ids, attention_mask, qformer_input_ids, qformer_attention_mask, rng):
    first, state, step, ctx, ctx_mask = steps.prefill(
        model, params, pixel_values, input_ids, attention_mask, max_new_tokens=o["max_new_tokens"],
        qformer_input_ids=qformer_input_ids, qformer_attention_mask=qformer_attention_mask)
    return search.search(step, state, first, ctx, ctx_mask, rng=rng, **o)
  return xla.jit(run)


def generate(model, params, pixel_values, input_ids=None, attention_mask=None, *, qformer_input_ids=None,
             qformer_attention_mask=None, rng=None, **options):
  """Generates text conditioned on images: int32 (B, max_new_tokens) of new tokens only, padded with
  `pad_token_id` after EOS. Options and their defaults are HF `generate`'s: max_new_tokens=30,
  min_new_tokens=0, num_beams=1, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
  length_penalty=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id / pad_token_id
  (default: the LLM config's). Prefill and search are one compiled program per model, option set
  and input shapes; `input_ids` hold the prompt's text tokens only (left-padded for OPT / LLaMA).
  """
  unknown = set(options) - set(_GEN_DEFAULTS)
  if unknown:
    raise TypeError(f"unknown generation option(s) {sorted(unknown)}; known: {sorted(_GEN_DEFAULTS)}")
  registry.require(model, registry.LM, "generation")
  o = dict(_GEN_DEFAULTS, **options)
  text = model.config.text
  if o["eos_token_id"] is None:
    o["eos_token_id"] = text.eos_token_id
  if o["pad_token_id"] is None:
    o["pad_token_id"] = text.pad_token_id
  if o["do_sample"] and rng is None:
    raise ValueError("do_sample=True needs rng=jax.random.key(...)")
  if rng is None:
    rng = jax.random.PRNGKey(0)
  fn = _generate_fn(model, tuple(sorted(o.items())))
  return fn(params, jnp.asarray(pixel_values, jnp.float32), input_ids, attention_mask, qformer_input_ids,
            qformer_attention_mask, rng)
