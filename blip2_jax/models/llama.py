"""LLaMA decoder-only language model (HF `LlamaForCausalLM`), Flax linen, and the families that
are LLaMA plus switches, by their configs: Qwen2 / Qwen2.5 (`Qwen2Config`: q / k / v biases,
optional sliding windows), Qwen3 (`Qwen3Config`: RMSNorm per query / key head), Mistral
(`MistralConfig`: sliding-window attention). Gemma 2 / 3 (`gemma`) reuse the attention and MLP.

Parameter tree (unrolled), mirroring HF names:
  model/embed_tokens/embedding                  (vocab, hidden)
  model/layers_{i}/self_attn/{q,k,v,o}_proj     (GQA: k/v have num_key_value_heads * head_dim)
  model/layers_{i}/self_attn/{q,k}_norm/scale   (Qwen3)
  model/layers_{i}/mlp/{gate,up,down}_proj
  model/layers_{i}/{input,post_attention}_layernorm/scale
  model/norm/scale
  lm_head/kernel                                (untied models only)
The head, the input handling, the masks (sliding windows too) and the cache plumbing are
`causal_lm`'s. Sliding windows are index-based as HF's (`kv > q - window`, left padding counts).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

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
  """LLaMA's config, and the base of the families that are LLaMA plus switches (Qwen2, Qwen3,
  Mistral, Gemma): they add their HF fields and override the properties under "what the layer
  computes", which LLaMA's attention, MLP and name table read."""
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

  model_type: ClassVar[str] = "llama"  # the HF model_type this class reads
  hf_class: ClassVar[str] = "LlamaConfig"  # its transformers config class
  hf_names: ClassVar[dict] = {}  # our field -> HF attribute, where the names differ

  def __post_init__(self):
    super().__post_init__()
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    for f in ("eos_token_id", "layer_types"):
      if isinstance(getattr(self, f, None), list):
        object.__setattr__(self, f, tuple(getattr(self, f)))
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_parameters.rope_type {self.rope_type!r} is not supported "
                       f"(supported: {ROPE_TYPES})")
    L.activation(self.hidden_act)

  # ---- what the layer computes (LLaMA's; the families override)
  @property
  def qkv_bias(self) -> bool:
    return self.attention_bias

  @property
  def o_bias(self) -> bool:
    return self.attention_bias

  @property
  def gate_bias(self) -> bool:  # the MLP's three projections
    return self.mlp_bias

  @property
  def qk_norm(self) -> bool:  # RMS-normalise each query / key head before RoPE (Qwen3, Gemma 3)
    return False

  @property
  def norm_offset(self) -> float:  # 1.0: Gemma's (1 + weight) RMSNorm
    return 0.0

  @property
  def attn_scale(self) -> float:
    return self.head_dim ** -0.5

  @property
  def attn_softcap(self) -> float | None:
    return None

  @property
  def windows(self) -> tuple | None:
    """Per layer, None (global attention) or its sliding window; None: all global."""
    return None

  @property
  def layer_norms(self) -> tuple[str, ...]:
    return ("input_layernorm", "post_attention_layernorm")

  # ---- HF configs
  @classmethod
  def _hf(cls, hf_config):
    """The transformers config of `hf_config` (or its dict), checked for model_type and causality."""
    import transformers
    if isinstance(hf_config, dict):
      hf_config = getattr(transformers, cls.hf_class).from_dict(hf_config)
    mt = getattr(hf_config, "model_type", cls.model_type)
    if mt != cls.model_type:
      raise ValueError(f"model_type: expected {cls.model_type!r}, got {mt!r}")
    if not getattr(hf_config, "is_causal", True) or getattr(hf_config, "use_bidirectional_attention", False):
      raise ValueError(f"is_causal / use_bidirectional_attention: bidirectional {cls.model_type} is not "
                       "supported")
    act = cls.hf_names.get("hidden_act", "hidden_act")
    try:
      L.activation(getattr(hf_config, act))
    except ValueError as e:
      raise ValueError(f"{act}: {e}") from None
    if hasattr(hf_config, "standardize_rope_params"):
      hf_config.standardize_rope_params()  # moves legacy rope_theta / rope_scaling in
    return hf_config

  @staticmethod
  def _rope_from_hf(rp: dict, what: str = "rope_parameters") -> dict:
    """Our rope_* fields of one HF rope-parameters dict."""
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"{what}.rope_type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
      raise ValueError(f"{what}.partial_rotary_factor {rp['partial_rotary_factor']} is not supported")
    kw = dict(rope_theta=float(rp["rope_theta"]), rope_type=rope_type)
    if rope_type in ("linear", "llama3"):
      kw["rope_factor"] = float(rp["factor"])
    if rope_type == "llama3":
      kw.update(rope_low_freq_factor=float(rp["low_freq_factor"]),
                rope_high_freq_factor=float(rp["high_freq_factor"]),
                rope_original_max_position_embeddings=int(rp["original_max_position_embeddings"]))
    return kw

  @classmethod
  def _rope_kw(cls, hf_config) -> dict:
    rp = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not rp:  # very old configs
      rp = dict(getattr(hf_config, "rope_scaling", None) or {})
      rp.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return cls._rope_from_hf(rp)

  def _rope_to_hf(self) -> dict:
    rp = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
    if self.rope_type in ("linear", "llama3"):
      rp["factor"] = self.rope_factor
    if self.rope_type == "llama3":
      rp.update(low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings)
    return rp

  @classmethod
  def _own_fields(cls):
    return [f.name for f in dataclasses.fields(cls)
            if not f.name.startswith("rope_") and f.name not in L.RUNTIME_FIELDS]

  @classmethod
  def from_hf(cls, hf_config, **runtime) -> "LlamaConfig":
    """From a transformers config of `model_type` (or its dict); ValueError naming what is not
    supported."""
    hf_config = cls._hf(hf_config)
    kw = {}
    for name in cls._own_fields():
      hf_name = cls.hf_names.get(name, name)
      if hasattr(hf_config, hf_name):
        kw[name] = getattr(hf_config, hf_name)
    kw.update(cls._rope_kw(hf_config))
    return cls(**kw, **runtime)

  def to_hf(self):
    import transformers
    hf_cls = getattr(transformers, self.hf_class)
    declared = {f.name for f in dataclasses.fields(hf_cls)} if dataclasses.is_dataclass(hf_cls) else None
    kw = {}
    for name in self._own_fields():
      hf_name, value = self.hf_names.get(name, name), getattr(self, name)
      # only what the HF class declares (its layer hard-codes the rest), and a head_dim it
      # would not derive
      if declared is None or hf_name in declared or (
          name == "head_dim" and value != self.hidden_size // self.num_attention_heads):
        kw[hf_name] = list(value) if isinstance(value, tuple) else value
    return hf_cls(**kw, rope_parameters=self._rope_to_hf())


@dataclasses.dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
  """Qwen2 / Qwen2.5 (HF `Qwen2ForCausalLM`): LLaMA with biases on the q / k / v projections (none on
  o, none in the MLP, whatever the config says) and optional sliding windows. As HF 5.23's
  Qwen2Config: `sliding_window` counts only with `use_sliding_window` (else it reads None), and
  unless `layer_types` is given, layers from `max_window_layers` on slide."""
  vocab_size: int = 151936
  use_sliding_window: bool = False
  sliding_window: int | None = None
  max_window_layers: int = 28
  layer_types: tuple[str, ...] | None = None
  bos_token_id: int | None = None
  eos_token_id: Any = None

  model_type: ClassVar[str] = "qwen2"
  hf_class: ClassVar[str] = "Qwen2Config"

  def __post_init__(self):
    super().__post_init__()
    if not self.use_sliding_window:
      object.__setattr__(self, "sliding_window", None)
    if self.layer_types is None:
      object.__setattr__(self, "layer_types", tuple(
          "sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
          else "full_attention" for i in range(self.num_hidden_layers)))
    check_layer_types(self)

  @property
  def qkv_bias(self) -> bool:
    return True

  @property
  def o_bias(self) -> bool:
    return False

  @property
  def gate_bias(self) -> bool:
    return False

  @property
  def windows(self):
    return layer_windows(self.layer_types, self.sliding_window)


@dataclasses.dataclass(frozen=True)
class Qwen3Config(Qwen2Config):
  """Qwen3 (HF `Qwen3ForCausalLM`): Qwen2's sliding-window options, `attention_bias` on all four
  attention projections (none in the MLP), an RMSNorm over each query / key head before RoPE
  (`self_attn.q_norm` / `k_norm`), head_dim from the config (128 by default)."""
  head_dim: int | None = 128

  model_type: ClassVar[str] = "qwen3"
  hf_class: ClassVar[str] = "Qwen3Config"
  qkv_bias = LlamaConfig.qkv_bias  # `attention_bias`, as LLaMA
  o_bias = LlamaConfig.o_bias

  @property
  def qk_norm(self) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class MistralConfig(LlamaConfig):
  """Mistral (HF `MistralForCausalLM`): LLaMA without biases, every layer attending over a sliding
  window of `sliding_window` positions (None: global). HF's Mistral ignores `layer_types` (it warns
  and points to Ministral), and so do we."""
  vocab_size: int = 32000
  num_key_value_heads: int | None = 8
  sliding_window: int | None = 4096

  model_type: ClassVar[str] = "mistral"
  hf_class: ClassVar[str] = "MistralConfig"

  @property
  def qkv_bias(self) -> bool:
    return False

  o_bias = gate_bias = qkv_bias

  @property
  def windows(self):
    return None if self.sliding_window is None else (self.sliding_window,) * self.num_hidden_layers


LAYER_TYPES = ("full_attention", "sliding_attention")


def check_layer_types(cfg) -> None:
  """ValueError naming a `layer_types` HF would not run: unknown types, the wrong count, sliding
  layers without a window."""
  if len(cfg.layer_types) != cfg.num_hidden_layers:
    raise ValueError(f"layer_types has {len(cfg.layer_types)} entries for {cfg.num_hidden_layers} layers")
  bad = sorted(set(cfg.layer_types) - set(LAYER_TYPES))
  if bad:
    raise ValueError(f"layer_types {bad} are not supported (supported: {LAYER_TYPES})")
  if "sliding_attention" in cfg.layer_types and not cfg.sliding_window:
    raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")


def layer_windows(layer_types, sliding_window):
  """Per-layer windows (see causal_lm.layer_kinds) of HF `layer_types`; None when all are global."""
  if "sliding_attention" not in layer_types:
    return None
  return tuple(sliding_window if t == "sliding_attention" else None for t in layer_types)


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
  return L.norm(cfg, name, eps=cfg.rms_norm_eps, rms=True, scale_offset=cfg.norm_offset)


class LlamaAttention(nn.Module):
  """LLaMA's attention and its switches (config properties): biases (`qkv_bias`, `o_bias`), an
  RMSNorm per query / key head before RoPE (`qk_norm`), the logit scale (`attn_scale`) and
  soft-cap (`attn_softcap`)."""
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    nq, nkv, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.q_proj = L.dense(cfg, nq * h, ("embed", "heads"), "q_proj", use_bias=cfg.qkv_bias)
    self.k_proj = L.dense(cfg, nkv * h, ("embed", "kv_heads"), "k_proj", use_bias=cfg.qkv_bias)
    self.v_proj = L.dense(cfg, nkv * h, ("embed", "kv_heads"), "v_proj", use_bias=cfg.qkv_bias)
    self.o_proj = L.dense(cfg, cfg.hidden_size, ("heads", "embed"), "o_proj", use_bias=cfg.o_bias)
    if cfg.qk_norm:
      self.q_norm, self.k_norm = _rms(cfg, "q_norm"), _rms(cfg, "k_norm")

  def __call__(self, x, bias, cos, sin, cache_index=None, cache=None):
    """-> out, or (out, new cache) with a per-layer `cache` of rotated keys and values (see
    causal_lm.self_attention)."""
    cfg = self.config
    q = L.split_heads(self.q_proj(x), cfg.num_attention_heads)
    k = L.split_heads(self.k_proj(x), cfg.num_key_value_heads)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    v = L.split_heads(self.v_proj(x), cfg.num_key_value_heads)
    out, cache = causal_lm.self_attention(q, k, v, bias, scale=cfg.attn_scale, config=cfg,
                                          cache=cache, cache_index=cache_index,
                                          logit_softcap=cfg.attn_softcap)
    out = self.o_proj(L.merge_heads(out))
    return out if cache is None else (out, cache)


class LlamaMLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    d, m, bias = cfg.hidden_size, cfg.intermediate_size, cfg.gate_bias
    gate = L.dense(cfg, m, ("embed", "mlp"), "gate_proj", use_bias=bias)(x)
    up = L.dense(cfg, m, ("embed", "mlp"), "up_proj", use_bias=bias)(x)
    h = L.constrain(L.activation(cfg.hidden_act)(gate) * up, (L.BATCH, L.LENGTH, "activation_mlp"))
    return L.dense(cfg, d, ("mlp", "embed"), "down_proj", use_bias=bias)(h)


class LlamaDecoderLayer(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, bias, cos, sin, cache_index=None, cache=None, *, kind=None):
    """-> x, or (x, new cache) when a per-layer `cache` is given. `kind`: this layer's attention
    variant when the stack mixes sliding and global layers (causal_lm.run_layers)."""
    cfg = self.config
    bias, cos, sin = causal_lm.for_kind(kind, bias, cos, sin)
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


def position_ids_of(position_ids, t: int, cache_index=None):
  """(B|1, T) RoPE positions: as given, else HF's arange (+ the cache's length when decoding)."""
  if position_ids is None and cache_index is not None:
    position_ids = (cache_index + jnp.arange(t))[None]  # as HF's arange + past length
  if position_ids is None:
    position_ids = jnp.arange(t)[None]  # HF: arange positions even with left padding
  position_ids = jnp.asarray(position_ids)
  return position_ids[None] if position_ids.ndim == 1 else position_ids


class LlamaModel(nn.Module):
  """HF LlamaModel (also Qwen2 / Qwen3 / Mistral: their switches are the config's)."""
  config: LlamaConfig
  layer_cls = LlamaDecoderLayer

  def setup(self):
    cfg = self.config
    self.embed_tokens = self.make_embed()
    self.norm = _rms(cfg, "norm")

  def make_embed(self):
    return L.embed(self.config, self.config.vocab_size, self.config.hidden_size, "embed_tokens")

  def attend(self, h):
    return self.embed_tokens.attend(h)

  def rope(self, position_ids, t: int):
    """The layers' RoPE cos / sin for (B|1, T) positions (Gemma 3: one pair per attention kind)."""
    cfg = self.config
    return rope_cos_sin(cfg, jnp.broadcast_to(position_ids, (position_ids.shape[0], t)), cfg.jdtype)

  @nn.compact
  def __call__(self, inputs_embeds, attention_mask=None, position_ids=None, *, deterministic=True,
               cache=None, cache_index=None):
    """-> (hidden, new cache or None); masks and cache as `causal_lm.run_layers`."""
    cfg = self.config
    if not deterministic and cfg.attention_dropout > 0:
      raise NotImplementedError("attention_dropout > 0 in training is not implemented")
    t = inputs_embeds.shape[1]
    position_ids = position_ids_of(position_ids, t, None if cache is None else cache_index)
    # = HF create_causal_mask on a default forward (use_cache=True, so no packed-sequence
    # detection): explicit position_ids move RoPE only, never the mask.
    x = L.constrain(inputs_embeds.astype(cfg.jdtype), ACT_AXES)
    cos, sin = self.rope(position_ids, t)
    x, cache = causal_lm.run_layers(self, self.layer_cls, {"config": cfg}, x, attention_mask,
                                    cos, sin, cache=cache, cache_index=cache_index,
                                    windows=cfg.windows)
    return L.constrain(self.norm(x), ACT_AXES), cache


class LlamaForCausalLM(causal_lm.CausalLM):
  """HF LlamaForCausalLM (Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM with their
  configs): `inputs_embeds` (B, T, hidden) replaces the embedding lookup."""
  config: LlamaConfig
  model_cls = LlamaModel


# ----------------------------------------------------------------------------------------
# HF name table


def hf_rules(config: LlamaConfig) -> list[Rule]:
  """Flax (unrolled) <-> HF `LlamaForCausalLM` state-dict names (and those of the families on
  LLaMA's layer: every projection is `model/layers_{i}/{self_attn,mlp}/<name>_proj/kernel`)."""
  n = config.num_hidden_layers
  rules = [Rule("model/embed_tokens/embedding", "model.embed_tokens.weight"),
           Rule("model/norm/scale", "model.norm.weight")]
  norms = list(config.layer_norms)
  if config.qk_norm:
    norms += ["self_attn/q_norm", "self_attn/k_norm"]
  for nm in norms:
    rules.append(Rule(f"model/layers_{{i}}/{nm}/scale",
                      f"model.layers.{{i}}.{nm.replace('/', '.')}.weight", layers=n))
  lins = [(f"self_attn/{x}_proj", config.qkv_bias) for x in "qkv"]
  lins += [("self_attn/o_proj", config.o_bias)]
  lins += [(f"mlp/{x}_proj", config.gate_bias) for x in ("gate", "up", "down")]
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
