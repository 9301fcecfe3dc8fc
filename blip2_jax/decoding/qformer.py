"""Stage-1 captioning with the Q-Former's own LM head (ITG), as LAVIS `Blip2Qformer.generate`.

The text starts with `[DEC]` (the BERT tokenizer's added bos token) and ends at `[SEP]`; each step
runs the Q-Former over [queries; text so far] under the UniLM mask (queries see only queries and
cross-attend to the image, text sees every query and earlier text) and reads the next-token
logits from the BERT `cls.predictions` head tied to the Q-Former word embeddings. LAVIS's
defaults: beam search with 3 beams, max_length 30 and min_length 10, both counting `[DEC]`.

The text buffer has a fixed length (1 + max_new_tokens) so the whole search is one compiled
program; positions after the current one are masked out (and causally invisible anyway). The
ViT runs once; the Q-Former re-runs its query stream each step: LAVIS does the same (its
`prepare_inputs_for_generation` reads `past`, which transformers >= 4.2x never passes), and the
Q-Former is small next to the ViT.

The LM head is not part of HF's `Blip2ForImageTextRetrieval`: it lives in
`qformer_lm_head.safetensors` beside the HF files (`checkpoints.hf.save_qformer_head`), written by
stage-1 training, `checkpoints.towers` and the LAVIS converter.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from blip2_jax.core import xla
from blip2_jax.decoding import search
from blip2_jax.models import qformer, registry

# LAVIS Blip2Qformer.generate: num_beams=3, max_length=30, min_length=10 (lengths include [DEC]).
DEFAULTS = dict(max_new_tokens=29, min_new_tokens=9, num_beams=3, do_sample=False, temperature=1.0,
                top_k=0, top_p=1.0, length_penalty=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0)


def checked_options(config, **options) -> dict:
  """`DEFAULTS` updated by `options` (`search.with_defaults`), checked (`search.check_options`) and held
  to the Q-Former's positions: [DEC] and the new tokens go through its learned position table
  (`max_position_embeddings`). ValueError naming the numbers. `config`: the model's Blip2Config."""
  unknown = set(options) - set(DEFAULTS)
  if unknown:
    raise TypeError(f"unknown generation option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
  o = search.with_defaults(DEFAULTS, options)
  search.check_options(**o)
  limit = config.qformer.max_position_embeddings
  if 1 + o["max_new_tokens"] > limit:
    raise ValueError(f"[DEC] + {o['max_new_tokens']} new tokens = {1 + o['max_new_tokens']} positions, but the "
                     f"Q-Former has {limit} positions (max_position_embeddings, learned); at most {limit - 1} new "
                     "tokens fit")
  return o


def _check_model(model):
  if not registry.can(model, registry.ITG):
    raise TypeError(f"Q-Former captioning needs a Blip2ForImageTextRetrieval (stage-1) model, not "
                    f"{model.config.architecture}; captioning with an LLM goes through blip2_jax.generate")


def lm_logits(model, params, lm_head_params, image_embeds, tokens, text_mask):
  """(B, T, V) float32 next-token logits of the ITG pass for `tokens` (B, T) under `text_mask`."""
  h = model.apply({"params": params}, image_embeds, tokens, text_mask, method="itg_hidden")
  table = params["embeddings"]["word_embeddings"]["embedding"]
  head = qformer.QFormerLMHead(model.config.qformer, tie_word_embeddings="decoder" not in lm_head_params)
  return head.apply({"params": lm_head_params}, h, table).astype(jnp.float32)


def prefill(model, params, lm_head_params, pixel_values, *, bos_token_id: int, max_new_tokens: int,
            interpolate_pos_encoding: bool = False):
  """-> (first_logits (B, V), state, step_fn, context_ids (B, 1) = [DEC], context_mask), the
  `search.search` interface."""
  _check_model(model)
  vis = model.apply({"params": params}, pixel_values, interpolate_pos_encoding,
                    method=lambda m, px, i: m._vision(px, i, True))
  image_embeds = vis["last_hidden_state"]
  b = image_embeds.shape[0]
  t = 1 + max_new_tokens
  tokens = jnp.zeros((b, t), jnp.int32).at[:, 0].set(bos_token_id)
  pos = jnp.arange(t)[None, :]

  def logits_at(image_embeds, tokens, index):  # logits after the first `index` tokens
    mask = (pos < index[:, None]).astype(jnp.int32)
    logits = lm_logits(model, params, lm_head_params, image_embeds, tokens, mask)
    return jnp.take_along_axis(logits, (index - 1)[:, None, None], axis=1)[:, 0]

  def step_fn(state, new_tokens, step=None):
    del step  # the state carries its own position
    idx = state["index"]
    tokens = jnp.where(pos == idx[:, None], new_tokens.astype(jnp.int32)[:, None], state["tokens"])
    new = {"image_embeds": state["image_embeds"], "tokens": tokens, "index": idx + 1}
    return logits_at(state["image_embeds"], tokens, idx + 1), new

  state = {"image_embeds": image_embeds, "tokens": tokens, "index": jnp.ones((b,), jnp.int32)}
  first = logits_at(image_embeds, tokens, state["index"])
  ctx = jnp.full((b, 1), bos_token_id, jnp.int32)
  return first, state, step_fn, ctx, jnp.ones((b, 1), jnp.int32)


@functools.lru_cache(maxsize=16)
def _generate_fn(model, bos: int, opts: tuple):
  o = dict(opts)

  def run(params, lm_head_params, pixel_values, rng):
    first, state, step, ctx, mask = prefill(model, params, lm_head_params, pixel_values, bos_token_id=bos,
                                            max_new_tokens=o["max_new_tokens"])
    return search.search(step, state, first, ctx, mask, rng=rng, return_finite=True, **o)
  return xla.jit(run)


def generate(model, params, lm_head_params, pixel_values, *, bos_token_id: int, eos_token_id: int,
             pad_token_id: int = 0, rng=None, **options):
  """Captions images with the Q-Former LM head: int32 (B, max_new_tokens) new tokens (after
  `[DEC]`), `pad_token_id` after `[SEP]` (eos). Options as `blip2_jax.generate` (HF `generate`
  semantics) with LAVIS's defaults (`DEFAULTS`: beams 3, max_new_tokens 29, min_new_tokens 9);
  `do_sample=True, top_p=0.9, num_beams=1` is LAVIS's nucleus sampling; `rng` is one key, or one
  key per image (typed (B,) or raw (B, 2)): image n then samples from its own key alone, whatever
  the batch (`search`). Tokens: `bos_token_id` is `[DEC]`, `eos_token_id` `[SEP]` (the tokenizer's
  bos / sep ids)."""
  _check_model(model)
  vocab = model.config.qformer.vocab_size
  for name, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
    if v is None or not 0 <= int(v) < vocab:
      raise ValueError(f"{name}={v} is not a token of the Q-Former vocabulary (size {vocab})")
  if "transform" not in lm_head_params or "bias" not in lm_head_params:
    raise ValueError("lm_head_params is not a Q-Former LM head (expects transform/..., bias; see "
                     "checkpoints.hf.load_qformer_head)")
  o = dict(checked_options(model.config, **options), eos_token_id=int(eos_token_id), pad_token_id=int(pad_token_id))
  if o["do_sample"] and rng is None:
    raise ValueError("do_sample=True needs rng=jax.random.key(...)")
  rng = jax.random.PRNGKey(0) if rng is None else rng
  fn = _generate_fn(model, int(bos_token_id), tuple(sorted(o.items())))
  tokens, finite = fn(params, lm_head_params, jnp.asarray(pixel_values, jnp.float32), rng)
  return search.raise_if_not_finite(tokens, finite, "the Q-Former LM head's logits")
