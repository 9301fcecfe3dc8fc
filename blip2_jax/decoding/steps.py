"""Cached decoding for BLIP-2 composites: the prefill and the per-token step a search drives.

`prefill` reproduces what HF `Blip2ForConditionalGeneration.generate` /
`InstructBlipForConditionalGeneration.generate` (transformers 5.23) hand to
`language_model.generate`, runs the prompt once, and returns the inputs of
`blip2_jax.decoding.search.search`:

  first_logits, state, step_fn, context_ids, context_mask = prefill(model, params, px, ids, mask,
                                                                    max_new_tokens=20)
  step_fn(state, tokens (N,), step) -> (logits (N, V) float32, new state)

`lm_prefill` does the same for a decoder-only LLM alone (text in, text out).

Decoder-only LLMs (OPT, LLaMA, Qwen2 / 3, Mistral, Gemma 2 / 3): HF's input_ids are the processor's `[pad...; <image> * Q; prompt]`
(left padding) or `[<image> * Q; prompt; pad...]` (right padding): the image tokens come right
before the first real token. Our `input_ids` hold text only, so the same layout is built here
with the projected queries in the image slots (no prompt: `[<image> * Q; bos]`, as HF).
Positions are what `generate` feeds (`cumsum(mask) - 1`, pads 0, then last + 1 per new token),
the key mask is the prompt mask followed by ones.
T5: the encoder runs once on the same layout, the decoder starts from decoder_start_token_id, and
the cross-attention keys/values are computed once, in the prefill.

Everything is traceable: call `prefill` and the search inside one `jax.jit` with `params` as an
argument of the jitted function (step_fn closes over them; closing over concrete params would
bake them into the program as constants). `max_new_tokens` must be static.
The search's state needs batch-leading leaves, so the caches (layer-leading inside the models,
for nn.scan) are kept in the state as a list of per-layer (B, ...) caches, stacked for each step.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from blip2_jax.models import causal_lm, registry

Array = jax.Array
StepFn = Callable[[Any, Array, Array], tuple[Array, Any]]


def to_batch_major(cache):
  """Layer-leading cache (L, B, ...) -> list of L per-layer caches (B, ...): batch-leading leaves
  for the search without moving any data (a transpose copied the whole cache every step)."""
  n = jax.tree_util.tree_leaves(cache)[0].shape[0]
  return [jax.tree_util.tree_map(lambda a, i=i: a[i], cache) for i in range(n)]


def to_layer_major(cache):
  """Inverse of `to_batch_major`. Unrolled models index the stack right back per layer, which
  XLA folds away (slice of concatenate), so each layer's buffer is updated in place; a scanned
  model pays one stacking copy."""
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *cache)


def insert_queries(queries: Array, text_embeds: Array, input_ids: Array, attention_mask: Array,
                   image_token_index: int):
  """HF's prompt layout: the Q query slots go right before each row's first real text token
  (after any left padding). -> embeds (B, Q+T, D), ids (B, Q+T) with `image_token_index` in the
  query slots, mask (B, Q+T)."""
  b, q = queries.shape[:2]
  t = input_ids.shape[1]
  mask = attention_mask.astype(jnp.int32)
  lead = jnp.argmax(mask != 0, axis=1)[:, None]  # leading pads (0 for right padding)
  p = jnp.arange(q + t)[None]
  is_q = (p >= lead) & (p < lead + q)
  text_idx = jnp.clip(jnp.where(p < lead, p, p - q), 0, t - 1)
  q_idx = jnp.clip(p - lead, 0, q - 1)
  take = lambda a, i: jnp.take_along_axis(a, i.reshape(i.shape + (1,) * (a.ndim - 2)), axis=1)
  embeds = jnp.where(is_q[..., None], take(queries.astype(text_embeds.dtype), q_idx),
                     take(text_embeds, text_idx))
  ids = jnp.where(is_q, image_token_index, take(input_ids, text_idx))
  new_mask = jnp.where(is_q, 1, take(mask, text_idx))
  return embeds, ids.astype(jnp.int32), new_mask.astype(jnp.int32)


def prefill(model, params, pixel_values, input_ids=None, attention_mask=None, *,
            max_new_tokens: int, qformer_input_ids=None, qformer_attention_mask=None):
  """-> (first_logits (B, V) float32, state, step_fn, context_ids (B, C), context_mask (B, C)).

  `model` is a `blip2.Blip2ForConditionalGeneration` (BLIP-2 or InstructBLIP), `params` its
  parameters, `input_ids` / `attention_mask` the text prompt (text tokens only, as for the
  model's forward; None: no prompt). `step` is accepted for the search API but unused: the state
  carries its own cache slot, so step_fn never depends on how the search counts."""
  cfg = model.config
  text_cfg = cfg.text
  variables = {"params": params}
  feats = model.apply(variables, pixel_values, qformer_input_ids, qformer_attention_mask,
                      method=lambda m, *a: m.get_image_features(*a))
  queries = feats["language_model_inputs"]
  b, q = queries.shape[:2]
  if input_ids is None:
    if cfg.is_encoder_decoder:
      # HF builds [<image> * Q; text_config.bos_token_id]; T5 configs carry no bos id (HF fails
      # there), so the encoder sees the queries alone, as LAVIS does for an empty prompt.
      bos = None
    else:
      bos = text_cfg.bos_token_id
    input_ids = jnp.zeros((b, 0), jnp.int32) if bos is None else jnp.full((b, 1), bos, jnp.int32)
    attention_mask = None
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  image_token = cfg.image_token_index if cfg.image_token_index is not None else -1
  lm_call = _lm_call(model)
  text_embeds = model.apply(variables, input_ids, method=lm_call(lambda lm, i: lm.embed_tokens(i)))
  if input_ids.shape[1]:
    embeds, ids, mask = insert_queries(queries, text_embeds, input_ids, attention_mask, image_token)
  else:
    embeds = queries.astype(text_embeds.dtype)
    ids, mask = jnp.full((b, q), image_token, jnp.int32), jnp.ones((b, q), jnp.int32)

  if cfg.is_encoder_decoder:
    return _prefill_t5(model, variables, lm_call, embeds, mask, max_new_tokens)
  first, state, step_fn = _prefill_decoder(model, params, embeds, mask, max_new_tokens)
  return first, state, step_fn, ids, mask


def lm_prefill(lm, params, input_ids, attention_mask=None, *, max_new_tokens: int):
  """`prefill` for a decoder-only language model alone (`causal_lm.CausalLM`, any family): HF
  `generate` on `input_ids` (B, T), left-padded by `attention_mask` (None: no padding), with the
  same positions, masks and cache. -> (first_logits, state, step_fn, input_ids, attention_mask)."""
  input_ids = jnp.asarray(input_ids, jnp.int32)
  mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  embeds = lm.apply({"params": params}, input_ids, method=lambda m, i: m.embed_tokens(i))
  first, state, step_fn = _prefill_decoder(lm, params, embeds, mask, max_new_tokens)
  return first, state, step_fn, input_ids, mask


def _text_config(model):
  return model.config if isinstance(model, causal_lm.CausalLM) else model.config.text


def _lm_call(model):
  """fn(language model, ...) -> an `apply` method of `model`: a BLIP-2 composite's
  `language_model`, or a decoder-only LLM itself."""
  if isinstance(model, causal_lm.CausalLM):
    return lambda fn: (lambda m, *a, **k: fn(m, *a, **k))
  return lambda fn: (lambda m, *a, **k: fn(m.language_model, *a, **k))


def _prefill_decoder(model, params, embeds, mask, max_new_tokens):
  """The decoder-only LLM's prefill over (B, P) input embeddings -> (first logits, state, step_fn)."""
  text_cfg = _text_config(model)
  b, p = mask.shape
  full_mask = jnp.concatenate([mask, jnp.ones((b, max_new_tokens), jnp.int32)], axis=1)
  positions = causal_lm.generation_position_ids(mask)
  cache = registry.family(text_cfg).init_cache(text_cfg, b, p + max_new_tokens)
  out = model.apply({"params": params}, method=_lm_call(model)(lambda lm: lm(
      inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions, cache=cache,
      cache_index=0)))
  state = {"cache": to_batch_major(out["cache"]), "mask": full_mask,
           "position": positions[:, -1] + 1,  # HF: position_ids[..., -1:] + 1 per new token
           "index": jnp.full((b,), p, jnp.int32)}
  step_fn = make_step_fn(model, params, shared_prefix=p)
  return out["logits"][:, -1].astype(jnp.float32), state, step_fn


def _prefill_t5(model, variables, lm_call, embeds, mask, max_new_tokens):
  text_cfg = model.config.text
  b, p = mask.shape
  enc = model.apply(variables, method=lm_call(lambda lm: lm.encode(
      inputs_embeds=embeds, attention_mask=mask)))
  start = jnp.full((b, 1), text_cfg.decoder_start_token_id, jnp.int32)
  cache = registry.family(text_cfg).init_cache(text_cfg, b, max_new_tokens + 1, p)
  out = model.apply(variables, method=lm_call(lambda lm: lm.decode(
      start, enc, mask, cache=cache, cache_index=0)))
  state = {"cache": to_batch_major(out["cache"]), "encoder_mask": mask,
           "index": jnp.ones((b,), jnp.int32)}

  # slot 0 (the start token) and the cross-attention keys / values are the same for every beam
  step_fn = make_step_fn(model, variables["params"], shared_prefix=1)
  return out["logits"][:, 0].astype(jnp.float32), state, step_fn, start, jnp.ones((b, 1), jnp.int32)


def reorder_cache(state, beam_idx, shared_prefix: int = 0):
  """HF's beam `reorder_cache` for a decoding state: every leaf's rows taken in `beam_idx` order,
  except what beams of one input share and a reorder cannot change (`beam_idx` only moves rows
  among the beams of the same input): the mask, positions and index, T5's cross-attention
  keys / values, and the key / value slots before `shared_prefix` (the prompt, written by the
  prefill for all beams alike). Only slots shared_prefix.. of the self-attention caches move:
  for a 36-slot prompt and 30 new tokens that is 45% of the bytes `x[beam_idx]` copies."""
  def take(cache):
    def one(name, x):
      if name not in ("k", "v"):  # T5 "ck" / "cv": computed from the encoder output, per input
        return x
      if shared_prefix <= 0:
        return x[beam_idx]
      # head-major (B, N, S, H) caches: the slots are axis 2
      tail = lax.slice_in_dim(x, shared_prefix, x.shape[2], axis=2)[beam_idx]
      return lax.dynamic_update_slice_in_dim(x, tail, shared_prefix, axis=2)
    return {name: one(name, x) for name, x in cache.items()}
  return dict(state, cache=[take(c) for c in state["cache"]])


def make_step_fn(model, params, *, shared_prefix: int = 0) -> StepFn:
  """The step function `prefill` (or `lm_prefill`: `model` an LLM alone) returns, on its own: it depends only on the model and its
  params, so a caller may jit the prefill and the steps separately. Its `reorder(state,
  beam_idx)` attribute is the beam search's cache reorder (`reorder_cache` with
  `shared_prefix`, the number of leading cache slots that every beam of an input shares)."""
  step_fn = _make_step_fn(model, params)
  step_fn.reorder = lambda state, beam_idx: reorder_cache(state, beam_idx, shared_prefix)
  return step_fn


def _make_step_fn(model, params) -> StepFn:
  variables = {"params": params}
  lm_call = _lm_call(model)

  if registry.family(_text_config(model)).encoder_decoder:
    def step_fn(state, tokens, step=None):
      del step  # the state carries its cache slot
      o = model.apply(variables, method=lm_call(lambda lm: lm.decode(
          tokens.astype(jnp.int32)[:, None], None, state["encoder_mask"],
          cache=to_layer_major(state["cache"]), cache_index=state["index"][0])))
      new = {"cache": to_batch_major(o["cache"]), "encoder_mask": state["encoder_mask"],
             "index": state["index"] + 1}
      return o["logits"][:, 0].astype(jnp.float32), new
    return step_fn

  def step_fn(state, tokens, step=None):
    del step  # the state carries its cache slot
    o = model.apply(variables, method=lm_call(lambda lm: lm(
        tokens.astype(jnp.int32)[:, None], state["mask"], position_ids=state["position"][:, None],
        cache=to_layer_major(state["cache"]), cache_index=state["index"][0])))
    new = {"cache": to_batch_major(o["cache"]), "mask": state["mask"],
           "position": state["position"] + 1, "index": state["index"] + 1}
    return o["logits"][:, 0].astype(jnp.float32), new
  return step_fn
