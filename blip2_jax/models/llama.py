"""LLaMA decoder-only language model (HF `LlamaForCausalLM`), Flax linen.

Parameter tree (unrolled), mirroring HF names:
  model/embed_tokens/embedding                  (vocab, hidden)
  model/layers_{i}/self_attn/{q,k,v,o}_proj     (GQA: k/v have num_key_value_heads * head_dim)
  model/layers_{i}/mlp/{gate,up,down}_proj
  model/layers_{i}/{input,post_attention}_layernorm/scale
  model/norm/scale
  lm_head/kernel                                (untied models only)
The head, the input handling and the cache plumbing are `causal_lm`'s.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from blip2_jax.core.naming import Rule
from blip2_jax.models import causal_lm
from blip2_jax.models import layers as L

ACT_AXES = (L.BATCH, L.LENGTH, L.EMBED)
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(L.Runtime):
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None  # None -> num_attention_heads
  head_dim: int | None = None  # None -> hidden_size // num_attention_heads
  hidden_act: str = "silu"
  max_position_embeddings: int = 2048
  initializer_range: float = 0.02
  rms_norm_eps: float = 1e-6
  attention_bias: bool = False
  attention_dropout: float = 0.0
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  # RoPE (HF `rope_parameters`): rope_type "default", "linear" (factor) or "llama3"
  # (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float | None = None
  rope_low_freq_factor: float | None = None
  rope_high_freq_factor: float | None = None
  rope_original_max_position_embeddings: int | None = None
  pad_token_id: int | None = None
  bos_token_id: int | None = 1
  eos_token_id: Any = 2  # int or tuple of ints

  def __post_init__(self):
    super().__post_init__()
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_parameters.rope_type {self.rope_type!r} is not supported "
                       f"(supported: {ROPE_TYPES})")
    L.activation(self.hidden_act)

  @classmethod
  def from_hf(cls, hf_config, **runtime) -> "LlamaConfig":
    import transformers
    if isinstance(hf_config, dict):
      hf_config = transformers.LlamaConfig.from_dict(hf_config)
    if getattr(hf_config, "model_type", "llama") != "llama":
      raise ValueError(f"model_type: expected 'llama', got {hf_config.model_type!r}")
    if not getattr(hf_config, "is_causal", True):
      raise ValueError("is_causal: bidirectional LLaMA is not supported")
    try:
      L.activation(hf_config.hidden_act)
    except ValueError as e:
      raise ValueError(f"hidden_act: {e}") from None
    if hasattr(hf_config, "standardize_rope_params"):
      hf_config.standardize_rope_params()  # moves legacy rope_theta / rope_scaling in
    rp = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not rp:  # very old configs
      rp = dict(getattr(hf_config, "rope_scaling", None) or {})
      rp.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_parameters.rope_type {rope_type!r} is not supported "
                       f"(supported: {ROPE_TYPES})")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
      raise ValueError(f"rope_parameters.partial_rotary_factor {rp['partial_rotary_factor']} "
                       "is not supported")
    kw = {f.name: getattr(hf_config, f.name) for f in dataclasses.fields(cls)
          if not f.name.startswith("rope_") and f.name not in L.RUNTIME_FIELDS and hasattr(hf_config, f.name)}
    kw.update(rope_theta=float(rp["rope_theta"]), rope_type=rope_type)
    if rope_type in ("linear", "llama3"):
      kw["rope_factor"] = float(rp["factor"])
    if rope_type == "llama3":
      kw.update(rope_low_freq_factor=float(rp["low_freq_factor"]),
                rope_high_freq_factor=float(rp["high_freq_factor"]),
                rope_original_max_position_embeddings=int(rp["original_max_position_embeddings"]))
    return cls(**kw, **runtime)

  def to_hf(self):
    import transformers
    kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
          if not f.name.startswith("rope_") and f.name not in L.RUNTIME_FIELDS}
    if isinstance(kw["eos_token_id"], tuple):
      kw["eos_token_id"] = list(kw["eos_token_id"])
    rp = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
    if self.rope_type in ("linear", "llama3"):
      rp["factor"] = self.rope_factor
    if self.rope_type == "llama3":
      rp.update(low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings)
    return transformers.LlamaConfig(**kw, rope_parameters=rp)


# ----------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """Inverse frequencies (head_dim // 2,) float32, as HF's ROPE_INIT_FUNCTIONS compute them."""
  dim = cfg.head_dim
  f32 = np.float32
  inv = f32(1.0) / (f32(cfg.rope_theta) ** (np.arange(0, dim, 2).astype(f32) / f32(dim)))
  if cfg.rope_type == "linear":
    inv = inv / f32(cfg.rope_factor)
  elif cfg.rope_type == "llama3":
    factor, lo, hi = f32(cfg.rope_factor), cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_position_embeddings
    low_wl, high_wl = old / lo, old / hi
    wavelen = f32(2 * math.pi) / inv
    inv_l = np.where(wavelen > low_wl, inv / factor, inv)
    smooth = ((f32(old) / wavelen - f32(lo)) / f32(hi - lo)).astype(f32)
    smoothed = (f32(1) - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    inv = np.where(medium, smoothed, inv_l)
  return inv.astype(f32)


def rope_cos_sin(cfg: LlamaConfig, position_ids, dtype):
  """(B, T) positions -> cos, sin of shape (B, T, head_dim) in `dtype` (HF: cat(freqs, freqs))."""
  inv = jnp.asarray(rope_inv_freq(cfg))
  freqs = position_ids.astype(jnp.float32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  # attention_scaling is 1.0 for the supported rope types.
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x):
  h = x.shape[-1] // 2
  return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x, cos, sin):
  """x (B, T, N, H); cos/sin (B, T, H)."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------
# modules


def _rms(cfg, name):
  return L.norm(cfg, name, eps=cfg.rms_norm_eps, rms=True)


class LlamaAttention(nn.Module):
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    nq, nkv, h, bias = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.attention_bias
    self.q_proj = L.dense(cfg, nq * h, ("embed", "heads"), "q_proj", use_bias=bias)
    self.k_proj = L.dense(cfg, nkv * h, ("embed", "kv_heads"), "k_proj", use_bias=bias)
    self.v_proj = L.dense(cfg, nkv * h, ("embed", "kv_heads"), "v_proj", use_bias=bias)
    self.o_proj = L.dense(cfg, cfg.hidden_size, ("heads", "embed"), "o_proj", use_bias=bias)

  def __call__(self, x, bias, cos, sin, cache_index=None, cache=None):
    """-> out, or (out, new cache) with a per-layer `cache` of rotated keys and values (see
    causal_lm.self_attention)."""
    cfg = self.config
    q = apply_rope(L.split_heads(self.q_proj(x), cfg.num_attention_heads), cos, sin)
    k = apply_rope(L.split_heads(self.k_proj(x), cfg.num_key_value_heads), cos, sin)
    v = L.split_heads(self.v_proj(x), cfg.num_key_value_heads)
    out, cache = causal_lm.self_attention(q, k, v, bias, scale=cfg.head_dim ** -0.5, config=cfg,
                                          cache=cache, cache_index=cache_index)
    out = self.o_proj(L.merge_heads(out))
    return out if cache is None else (out, cache)


class LlamaMLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    d, m, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
    gate = L.dense(cfg, m, ("embed", "mlp"), "gate_proj", use_bias=bias)(x)
    up = L.dense(cfg, m, ("embed", "mlp"), "up_proj", use_bias=bias)(x)
    h = L.constrain(L.activation(cfg.hidden_act)(gate) * up, (L.BATCH, L.LENGTH, "activation_mlp"))
    return L.dense(cfg, d, ("mlp", "embed"), "down_proj", use_bias=bias)(h)


class LlamaDecoderLayer(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, bias, cos, sin, cache_index=None, cache=None):
    """-> x, or (x, new cache) when a per-layer `cache` is given."""
    cfg = self.config
    h = LlamaAttention(cfg, name="self_attn")(_rms(cfg, "input_layernorm")(x), bias, cos, sin,
                                              cache_index, cache)
    if cache is not None:
      h, cache = h
    x = L.constrain(x + h, ACT_AXES)
    h = LlamaMLP(cfg, name="mlp")(_rms(cfg, "post_attention_layernorm")(x))
    x = L.constrain(x + h, ACT_AXES)
    return x if cache is None else (x, cache)


def init_cache(config: LlamaConfig, batch: int, max_length: int, dtype=None) -> dict:
  """Empty key/value cache {"k", "v"}: (num_layers, batch, kv_heads, max_length, head_dim)."""
  return causal_lm.init_cache(config.num_hidden_layers, config.num_key_value_heads,
                              config.head_dim, batch, max_length, dtype or config.dtype)


class LlamaModel(nn.Module):
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = L.embed(cfg, cfg.vocab_size, cfg.hidden_size)
    self.norm = _rms(cfg, "norm")

  def attend(self, h):
    return self.embed_tokens.attend(h)

  @nn.compact
  def __call__(self, inputs_embeds, attention_mask=None, position_ids=None, *, deterministic=True,
               cache=None, cache_index=None):
    """-> (hidden, new cache or None); masks and cache as `causal_lm.run_layers`."""
    cfg = self.config
    if not deterministic and cfg.attention_dropout > 0:
      raise NotImplementedError("attention_dropout > 0 in training is not implemented")
    t = inputs_embeds.shape[1]
    if position_ids is None and cache is not None:
      position_ids = (cache_index + jnp.arange(t))[None]  # as HF's arange + past length
    if position_ids is None:
      position_ids = jnp.arange(t)[None]  # HF: arange positions even with left padding
    position_ids = jnp.asarray(position_ids)
    position_ids = position_ids[None] if position_ids.ndim == 1 else position_ids
    # = HF create_causal_mask on a default forward (use_cache=True, so no packed-sequence
    # detection): explicit position_ids move RoPE only, never the mask.
    x = L.constrain(inputs_embeds.astype(cfg.jdtype), ACT_AXES)
    cos, sin = rope_cos_sin(cfg, jnp.broadcast_to(position_ids, (position_ids.shape[0], t)),
                            cfg.jdtype)
    x, cache = causal_lm.run_layers(self, LlamaDecoderLayer, {"config": cfg}, x, attention_mask,
                                    cos, sin, cache=cache, cache_index=cache_index)
    return L.constrain(self.norm(x), ACT_AXES), cache


class LlamaForCausalLM(causal_lm.CausalLM):
  """HF LlamaForCausalLM: `inputs_embeds` (B, T, hidden) replaces the embedding lookup."""
  config: LlamaConfig
  model_cls = LlamaModel


# ----------------------------------------------------------------------------------------
# HF name table


def hf_rules(config: LlamaConfig) -> list[Rule]:
  """Flax (unrolled) <-> HF `LlamaForCausalLM` state-dict names."""
  n = config.num_hidden_layers
  rules = [Rule("model/embed_tokens/embedding", "model.embed_tokens.weight"),
           Rule("model/norm/scale", "model.norm.weight")]
  for nm in ("input_layernorm", "post_attention_layernorm"):
    rules.append(Rule(f"model/layers_{{i}}/{nm}/scale", f"model.layers.{{i}}.{nm}.weight", layers=n))
  lins = [(f"self_attn/{x}_proj", config.attention_bias) for x in "qkvo"]
  lins += [(f"mlp/{x}_proj", config.mlp_bias) for x in ("gate", "up", "down")]
  for lin, has_bias in lins:
    hf = "model.layers.{i}." + lin.replace("/", ".")
    rules.append(Rule(f"model/layers_{{i}}/{lin}/kernel", hf + ".weight", "linear", layers=n))
    if has_bias:
      rules.append(Rule(f"model/layers_{{i}}/{lin}/bias", hf + ".bias", layers=n))
  if not config.tie_word_embeddings:
    rules.append(Rule("lm_head/kernel", "lm_head.weight", "linear"))
  return rules


def hf_ignore(config: LlamaConfig) -> list[str]:
  """HF keys that may be present without a rule: lm_head.weight saved alongside a tied embedding,
  rotary inv_freq buffers of old checkpoints (non-persistent in current HF)."""
  return [r"lm_head\.weight", r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
          r"model\.rotary_emb\.inv_freq"]
