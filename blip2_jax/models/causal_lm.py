"""The decoder-only scaffold every decoder-only family shares (HF `*ForCausalLM`): OPT, LLaMA and
the LLaMA-like families (Qwen2, Qwen3, Mistral, Gemma 2 / 3).

token embedding -> layer stack (full, or cached decoding) -> final norm -> tied or untied head
(soft-capped where the config has a `final_logit_softcapping`, Gemma).
A family writes its layer, its decoder (embeddings, positions, norms; `model` here) and its
config on top; the head, the input handling, the masks (causal, padding, sliding windows) and the
key/value cache plumbing live here.

Key/value caches are head-major per layer and layer-leading for the stack:
{"k", "v"}: (num_layers, batch, kv_heads, slots, head_dim) (see `layers.cache_update`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from blip2_jax.models import layers as L


def init_cache(num_layers: int, kv_heads: int, head_dim: int, batch: int, max_length: int,
               dtype) -> dict:
  """Empty key/value cache {"k", "v"}: (num_layers, batch, kv_heads, max_length, head_dim)."""
  shape = (num_layers, batch, kv_heads, max_length, head_dim)
  dt = L.dtype_of(dtype)
  return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


def generation_position_ids(mask):
  """Positions HF `generate` feeds a decoder-only model for a (B, T) prompt mask: `cumsum(mask) -
  1`, pads 0 (GenerationMixin._prepare_position_ids_for_generation, transformers 5.23)."""
  mask = mask.astype(jnp.int32)
  return jnp.where(mask == 0, 0, jnp.cumsum(mask, axis=1) - 1)


def self_attention(q, k, v, bias, *, scale: float, config: L.Runtime, cache=None, cache_index=None,
                   logit_softcap: float | None = None):
  """Causal self-attention core on (B, T, N, H) queries and (B, T, K, H) keys/values (K divides N).

  Without `cache`: over the T positions, `bias` (causal + padding) -> (out, None). With `cache`
  ({"k", "v"}: (B, K, S, H)) the new keys/values go to slots cache_index.. and the queries attend
  over all S slots (`bias` masks them) -> (out, new cache). out: (B, T, N, H).
  `logit_softcap`: Gemma 2's attention soft-capping (see layers.attention)."""
  if cache is None:
    return L.attention(q, k, v, bias=bias, scale=scale, implementation=config.attn_impl,
                       dtype=config.jdtype, logit_softcap=logit_softcap), None
  k = L.cache_update(cache["k"], k, cache_index)
  v = L.cache_update(cache["v"], v, cache_index)
  out = L.cached_attention(q, k, v, bias=bias, scale=scale, dtype=config.jdtype,
                           logit_softcap=logit_softcap)
  return out, {"k": k, "v": v}


def layer_kinds(windows) -> tuple[tuple[int, ...] | None, tuple]:
  """-> (kinds, variants) of per-layer attention `windows` (None: global; an int: a sliding
  window of that many positions): `variants` the distinct windows in order of appearance,
  `kinds` each layer's index into them, or None when all layers are alike (no per-layer choice)."""
  if windows is None:
    return None, (None,)
  variants = tuple(dict.fromkeys(windows))
  if len(variants) == 1:
    return None, variants
  return tuple(variants.index(w) for w in windows), variants


def for_kind(kind, *args):
  """A layer's view of `run_layers`'s per-kind arguments: each tuple argument (one entry per
  variant) becomes the entry of this layer's `kind`; other arguments pass as they are."""
  if kind is None:
    return args
  return tuple(L.pick(a, kind) if isinstance(a, tuple) else a for a in args)


def run_layers(module: nn.Module, layer_cls, layer_kwargs: dict, x, attention_mask, *layer_args,
               cache=None, cache_index=None, windows=None):
  """The decoder's stack of `config.num_hidden_layers` layers, called from `module`'s compact
  method: its parameters appear as `<module>/layers_{i}` (or `layers`, scanned), like HF.

  Each layer is called as layer(x, bias, *layer_args[, cache_index, its cache]). Without `cache`:
  `attention_mask` (B, T) or None, bias causal + padding. With `cache` (init_cache, S slots) the T
  inputs sit at slots cache_index..cache_index+T-1 and `attention_mask` (B, S) marks valid slots
  (None: all). -> (x, new cache or None).
  `windows` (one per layer, see `layer_kinds`): sliding-window layers see only the last `window`
  positions (slots), in the full pass and in cached decoding alike (the cache keeps every slot).
  When layers differ, `bias` is a tuple (one per variant) and each layer gets `kind=`; it takes
  its own with `for_kind` (as it does any per-variant tuple among `layer_args`)."""
  cfg = layer_kwargs["config"]
  kinds, variants = layer_kinds(windows)
  stack = L.LayerStack(layer_cls, layer_kwargs, cfg.num_hidden_layers, scan=cfg.scan,
                       remat=cfg.remat, kinds=kinds)
  nn.share_scope(module, stack)
  t = x.shape[1]
  if cache is None:
    biases = tuple(L.causal_padding_bias(attention_mask, t, w) for w in variants)
  else:
    biases = tuple(L.cached_causal_bias(attention_mask, t, cache["k"].shape[3], cache_index, w)
                   for w in variants)
  bias = biases[0] if kinds is None else biases
  if cache is None:
    return stack(x, bias, *layer_args), None
  return stack(x, bias, *layer_args, cache_index, xs=cache)


class CausalLM(nn.Module):
  """HF `*ForCausalLM`: `model` (the family's decoder, `model_cls(config)`) and `lm_head`
  (embed -> vocab, no bias) unless the head is tied to the token embedding.

  The decoder provides `embed_tokens(ids)`, `attend(h)` (the tied head) and
  `__call__(inputs_embeds, attention_mask, position_ids, *, deterministic, cache, cache_index)
  -> (hidden, new cache or None)`."""
  config: Any
  model_cls = None  # set by each family

  def setup(self):
    cfg = self.config
    self.model = self.model_cls(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = L.dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head", use_bias=False)

  def embed_tokens(self, input_ids):
    """= HF `get_input_embeddings()(input_ids)`, in config.dtype."""
    return self.model.embed_tokens(input_ids)

  def __call__(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, position_ids=None,
               deterministic: bool = True, cache=None, cache_index=None):
    """-> dict(logits, last_hidden_state[, cache]). With `cache` (init_cache) and `cache_index`
    (int32 scalar, may be traced): cached decoding, `attention_mask` (B, S) over cache slots."""
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
      inputs_embeds = self.embed_tokens(input_ids)
    elif self.is_initializing():
      self.embed_tokens(jnp.zeros((1, 1), jnp.int32))  # create the table on an embeds-only init
    h, new_cache = self.model(inputs_embeds, attention_mask, position_ids,
                              deterministic=deterministic, cache=cache, cache_index=cache_index)
    logits = self.model.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
    # Gemma's final soft-capping; the other families' configs have no such field
    logits = L.softcap(logits, getattr(self.config, "final_logit_softcapping", None))
    logits = L.constrain(logits, (L.BATCH, L.LENGTH, "activation_vocab"))
    out = {"logits": logits, "last_hidden_state": h}
    if cache is not None:
      out["cache"] = new_cache
    return out
