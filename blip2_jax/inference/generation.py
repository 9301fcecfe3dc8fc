"""`generate`: prefill + search as one compiled program per model, options and shapes."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.core import xla
from blip2_jax.decoding import search, steps
from blip2_jax.models import blip2, registry

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
    return search.search(step, state, first, ctx, ctx_mask, rng=rng, return_finite=True, **o)
  return xla.jit(run)


def position_limit(config) -> tuple[int | None, str]:
  """(the most token positions the LLM of `config` (a Blip2Config or a model) takes, what sets it), or
  (None, why there is none). OPT: `max_position_embeddings`, a learned table (HF adds an offset of 2)
  that has no row beyond it: a longer sequence reads past the table. LLaMA and the other rotary
  families (Qwen2 / 3, Mistral, Gemma 2 / 3): `max_position_embeddings`, the length their rotary
  positions were trained to (HF's config states it; beyond it the model runs but is out of its
  training range). T5: relative position buckets, defined at any distance (every
  distance past `relative_attention_max_distance` shares the last bucket), so no limit."""
  cfg = config if isinstance(config, blip2.Blip2Config) else config.config
  fam = registry.family(cfg.text).name
  if fam == "t5":
    return None, "T5's relative positions have no hard limit"
  names = {"opt": "OPT", "llama": "LLaMA", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral",
           "gemma2": "Gemma 2", "gemma3": "Gemma 3"}
  name, kind = names.get(fam, fam), "learned" if fam == "opt" else "rotary, trained"
  n = int(cfg.text.max_position_embeddings)
  return n, f"{name} language model has {n} positions (max_position_embeddings, {kind})"


def check_context(config, prompt_tokens: int, max_new_tokens: int, *, qformer_prompt_tokens: int = 0) -> None:
  """ValueError with the numbers when a generation cannot fit the model's positions: decoder-only LLMs
  see the query outputs, the prompt and the new tokens in one sequence (HF's max_length counts all of
  them), which must fit `position_limit`; InstructBLIP's Q-Former reads the prompt through its learned
  position table (`qformer.max_position_embeddings`). `prompt_tokens`: the longest prompt, in tokens."""
  cfg = config if isinstance(config, blip2.Blip2Config) else config.config
  q_limit = cfg.qformer.max_position_embeddings
  if cfg.instruct and qformer_prompt_tokens > q_limit:
    raise ValueError(f"the prompt is {qformer_prompt_tokens} Q-Former tokens, but InstructBLIP's Q-Former has "
                     f"{q_limit} positions (qformer max_position_embeddings): shorten the prompt")
  limit, why = position_limit(cfg)
  if limit is None or cfg.is_encoder_decoder:
    return
  q = cfg.num_query_tokens
  need = q + prompt_tokens + max_new_tokens
  if need > limit:
    room = limit - q - prompt_tokens
    fix = (f"at most {room} new tokens fit this prompt" if room >= 1 else
           f"the queries and the prompt alone take {q + prompt_tokens}: shorten the prompt")
    raise ValueError(f"{q} query + {prompt_tokens} prompt + {max_new_tokens} new tokens = {need} positions, but "
                     f"the {why}; {fix}")


def _prompt_tokens(input_ids, attention_mask) -> int:
  """The longest prompt's real tokens (its attention mask's ones); the padded width when traced."""
  if input_ids is None:
    return 1  # [bos] (decoder-only; T5 is not position-limited)
  if attention_mask is None or isinstance(attention_mask, jax.core.Tracer):
    return int(np.shape(input_ids)[1])
  m = np.asarray(attention_mask)
  return int(m.sum(axis=1).max()) if m.size else 0


def generate(model, params, pixel_values, input_ids=None, attention_mask=None, *, qformer_input_ids=None,
             qformer_attention_mask=None, rng=None, **options):
  """Generates text conditioned on images: int32 (B, max_new_tokens) of new tokens only, padded with
  `pad_token_id` after EOS. Options and their defaults are HF `generate`'s: max_new_tokens=30,
  min_new_tokens=0, num_beams=1, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
  length_penalty=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id / pad_token_id
  (default: the LLM config's). Prefill and search are one compiled program per model, option set
  and input shapes; `input_ids` hold the prompt's text tokens only (left-padded for OPT / LLaMA).

  Checked before anything compiles (ValueError naming the numbers): the options (`search.check_options`:
  min_new_tokens above max_new_tokens, non-finite floats, ...) and the positions (`check_context`:
  queries + prompt + new tokens within an OPT / LLaMA model's max_position_embeddings). Logits that are
  not finite (NaN weights or inputs) raise `NonFiniteError` naming the inputs instead of returning
  tokens decoded from NaN (the search stops at the first such step).
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
  search.check_options(**o)
  check_context(model, _prompt_tokens(input_ids, attention_mask), o["max_new_tokens"],
                qformer_prompt_tokens=_prompt_tokens(qformer_input_ids, qformer_attention_mask)
                if qformer_input_ids is not None else 0)
  if rng is None:
    rng = jax.random.PRNGKey(0)
  fn = _generate_fn(model, tuple(sorted(o.items())))
  tokens, finite = fn(params, jnp.asarray(pixel_values, jnp.float32), input_ids, attention_mask, qformer_input_ids,
                      qformer_attention_mask, rng)
  return search.raise_if_not_finite(tokens, finite, "the language model's logits")

