"""OPT decoder-only language model (HF `OPTForCausalLM`), Flax linen.

Parameter tree (unrolled), mirroring HF names:
  model/decoder/embed_tokens/embedding          (vocab, word_embed_proj_dim)
  model/decoder/embed_positions/embedding       (max_position_embeddings + 2, hidden)
  model/decoder/project_in/kernel, project_out/kernel   (only if word_embed_proj_dim != hidden)
  model/decoder/layers_{i}/self_attn/{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm
  model/decoder/final_layer_norm                (pre-LN models only)
  lm_head/kernel                                (untied models only)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax.models import layers as L
from blip2_jax.weights.table import Rule

ACT_AXES = (L.BATCH, L.LENGTH, L.EMBED)
POS_OFFSET = 2  # OPTLearnedPositionalEmbedding: fairseq reserves ids 0, 1
LN_EPS = 1e-5  # torch nn.LayerNorm default; OPT has no config field for it


@dataclasses.dataclass(frozen=True)
class OPTConfig:
  vocab_size: int = 50272
  hidden_size: int = 768
  num_hidden_layers: int = 12
  ffn_dim: int = 3072
  max_position_embeddings: int = 2048
  do_layer_norm_before: bool = True
  remove_final_layer_norm: bool = False  # HF `_remove_final_layer_norm`
  word_embed_proj_dim: int | None = None  # None -> hidden_size
  dropout: float = 0.1
  attention_dropout: float = 0.0
  num_attention_heads: int = 12
  activation_function: str = "relu"
  layerdrop: float = 0.0
  init_std: float = 0.02
  enable_bias: bool = True
  layer_norm_elementwise_affine: bool = True
  tie_word_embeddings: bool = True
  pad_token_id: int | None = 1
  bos_token_id: int | None = 2
  eos_token_id: Any = 2  # int or tuple of ints
  # runtime
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan: bool = False
  remat: str = "none"
  attn_impl: str | None = None

  def __post_init__(self):
    if self.word_embed_proj_dim is None:
      object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                       f"{self.num_attention_heads}")
    L.activation(self.activation_function)  # fails early on an unknown name

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def has_final_layer_norm(self) -> bool:
    # HF OPTDecoder: post-LN models (OPT-350m) have no final norm, nor do old fine-tunes
    # flagged with `_remove_final_layer_norm`.
    return self.do_layer_norm_before and not self.remove_final_layer_norm

  @property
  def has_projections(self) -> bool:
    return self.word_embed_proj_dim != self.hidden_size

  @classmethod
  def from_hf(cls, hf_config, **runtime) -> "OPTConfig":
    import transformers
    if isinstance(hf_config, dict):
      hf_config = transformers.OPTConfig.from_dict(hf_config)
    if getattr(hf_config, "model_type", "opt") != "opt":
      raise ValueError(f"model_type: expected 'opt', got {hf_config.model_type!r}")
    if not getattr(hf_config, "is_causal", True):
      raise ValueError("is_causal: bidirectional OPT is not supported")
    try:
      L.activation(hf_config.activation_function)
    except ValueError as e:
      raise ValueError(f"activation_function: {e}") from None
    kw = {}
    for f in dataclasses.fields(cls):
      if f.name in L.RUNTIME_FIELDS:
        continue
      hf_name = "_remove_final_layer_norm" if f.name == "remove_final_layer_norm" else f.name
      if hasattr(hf_config, hf_name):
        kw[f.name] = getattr(hf_config, hf_name)
    return cls(**kw, **runtime)

  def to_hf(self):
    import transformers
    kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
          if f.name not in L.RUNTIME_FIELDS + ("remove_final_layer_norm",)}
    if isinstance(kw["eos_token_id"], tuple):
      kw["eos_token_id"] = list(kw["eos_token_id"])
    c = transformers.OPTConfig(**kw)
    c._remove_final_layer_norm = self.remove_final_layer_norm
    return c


# ----------------------------------------------------------------------------------------


def _norm(cfg, name):
  # Params sit directly under `name` (HF: `<name>.weight`, `<name>.bias`).
  affine = cfg.layer_norm_elementwise_affine
  return L.LayerNorm(eps=LN_EPS, use_scale=affine, use_bias=affine, dtype=L.dtype_of(cfg.dtype),
                     param_dtype=L.dtype_of(cfg.param_dtype), name=name)


def _dense(cfg, features, axes, name, use_bias=None):
  return L.Dense(features, axes=axes, use_bias=cfg.enable_bias if use_bias is None else use_bias,
                 dtype=L.dtype_of(cfg.dtype), param_dtype=L.dtype_of(cfg.param_dtype),
                 init_std=cfg.init_std, name=name)


class OPTAttention(nn.Module):
  config: OPTConfig

  def setup(self):
    cfg = self.config
    d = cfg.hidden_size
    self.q_proj = _dense(cfg, d, ("embed", "heads"), "q_proj")
    self.k_proj = _dense(cfg, d, ("embed", "heads"), "k_proj")
    self.v_proj = _dense(cfg, d, ("embed", "heads"), "v_proj")
    self.out_proj = _dense(cfg, d, ("heads", "embed"), "out_proj")

  def qkv(self, x):
    """(B, T, D) -> q, k, v of shape (B, T, N, H); q is already scaled like HF."""
    cfg = self.config
    # HF scales q right after the projection and calls attention with scaling 1.0.
    q = self.q_proj(x) * (cfg.head_dim ** -0.5)
    k, v = self.k_proj(x), self.v_proj(x)
    return tuple(L.split_heads(t, cfg.num_attention_heads) for t in (q, k, v))

  def attend(self, q, k, v, bias):
    """The attention core on (B, T, N, H) queries against (B, S, N, H) keys/values."""
    cfg = self.config
    out = L.attention(q, k, v, bias=bias, scale=1.0, implementation=cfg.attn_impl,
                      dtype=L.dtype_of(cfg.dtype))
    return self.out_proj(L.merge_heads(out))

  def __call__(self, x, bias, cache_index=None, cache=None):
    """With `cache` ({"k", "v"}: head-major (B, N, S, H)) the new keys/values are written at slots
    cache_index.. and the queries attend over all S slots (`bias` masks them); returns
    (out, new cache)."""
    q, k, v = self.qkv(x)
    if cache is None:
      return self.attend(q, k, v, bias)
    k = L.cache_update(cache["k"], k, cache_index)
    v = L.cache_update(cache["v"], v, cache_index)
    out = L.cached_attention(q, k, v, bias=bias, scale=1.0, dtype=L.dtype_of(self.config.dtype))
    return self.out_proj(L.merge_heads(out)), {"k": k, "v": v}


class OPTDecoderLayer(nn.Module):
  config: OPTConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, bias, cache_index=None, cache=None):
    """-> x, or (x, new cache) when a per-layer `cache` is given."""
    cfg = self.config
    pre = cfg.do_layer_norm_before
    drop = nn.Dropout(cfg.dropout)
    if not self.deterministic and cfg.attention_dropout > 0:
      raise NotImplementedError("attention_dropout > 0 in training is not implemented")

    residual = x
    h = _norm(cfg, "self_attn_layer_norm")(x) if pre else x
    h = OPTAttention(cfg, name="self_attn")(h, bias, cache_index, cache)
    if cache is not None:
      h, cache = h
    x = residual + drop(h, deterministic=self.deterministic)
    if not pre:
      x = _norm(cfg, "self_attn_layer_norm")(x)
    x = L.constrain(x, ACT_AXES)

    residual = x
    h = _norm(cfg, "final_layer_norm")(x) if pre else x
    h = _dense(cfg, cfg.ffn_dim, ("embed", "mlp"), "fc1")(h)
    h = L.constrain(L.activation(cfg.activation_function)(h), (L.BATCH, L.LENGTH, "activation_mlp"))
    h = _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "fc2")(h)
    x = residual + drop(h, deterministic=self.deterministic)
    if not pre:
      x = _norm(cfg, "final_layer_norm")(x)
    x = L.constrain(x, ACT_AXES)
    return x if cache is None else (x, cache)


def position_ids_from_mask(mask):
  """HF OPT: `cumsum(mask) * mask - 1` (left padding shifts positions; pads get -1)."""
  mask = mask.astype(jnp.int32)
  return jnp.cumsum(mask, axis=1) * mask - 1


def init_cache(config: OPTConfig, batch: int, max_length: int, dtype=None) -> dict:
  """Empty key/value cache {"k", "v"}: (num_layers, batch, heads, max_length, head_dim)."""
  shape = (config.num_hidden_layers, batch, config.num_attention_heads, max_length, config.head_dim)
  dt = L.dtype_of(dtype or config.dtype)
  return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


class OPTDecoder(nn.Module):
  config: OPTConfig

  def setup(self):
    cfg = self.config
    dt, pdt = L.dtype_of(cfg.dtype), L.dtype_of(cfg.param_dtype)
    self.embed_tokens = L.Embed(cfg.vocab_size, cfg.word_embed_proj_dim, dtype=dt, param_dtype=pdt,
                                init_std=cfg.init_std)
    self.embed_positions = L.Embed(cfg.max_position_embeddings + POS_OFFSET, cfg.hidden_size,
                                   dtype=dt, param_dtype=pdt, init_std=cfg.init_std,
                                   axes=("pos", "embed"))
    if cfg.has_projections:
      self.project_in = _dense(cfg, cfg.hidden_size, (None, "embed"), "project_in", use_bias=False)
      self.project_out = _dense(cfg, cfg.word_embed_proj_dim, ("embed", None), "project_out",
                                use_bias=False)
    if cfg.has_final_layer_norm:
      self.final_layer_norm = _norm(cfg, "final_layer_norm")

  @nn.compact
  def __call__(self, inputs_embeds, attention_mask=None, position_ids=None, deterministic=True,
               cache=None, cache_index=None):
    """Without `cache`: a full forward, `attention_mask` (B, T). With `cache` (see init_cache,
    S slots) the T inputs sit at slots cache_index..cache_index+T-1, `attention_mask` (B, S)
    marks valid slots (None: all), and the result is (hidden, new cache)."""
    cfg = self.config
    b, t = inputs_embeds.shape[:2]
    if cfg.layerdrop > 0 and not deterministic:
      raise NotImplementedError("layerdrop > 0 in training is not implemented")
    if position_ids is None and cache is not None:
      if attention_mask is None:
        position_ids = (cache_index + jnp.arange(t))[None]
      else:
        position_ids = jax.lax.dynamic_slice_in_dim(position_ids_from_mask(attention_mask),
                                                    cache_index, t, axis=1)
    if position_ids is None:
      pos_mask = attention_mask if attention_mask is not None else jnp.ones((b, t), jnp.int32)
      position_ids = position_ids_from_mask(pos_mask)
    pos = self.embed_positions(jnp.asarray(position_ids) + POS_OFFSET)
    x = inputs_embeds.astype(L.dtype_of(cfg.dtype))
    if cfg.has_projections:
      x = self.project_in(x)
    x = L.constrain(x + pos, ACT_AXES)
    stack = L.LayerStack(OPTDecoderLayer, {"config": cfg, "deterministic": deterministic},
                         cfg.num_hidden_layers, scan=cfg.scan, remat=cfg.remat)
    nn.share_scope(self, stack)  # layers appear as decoder/layers_{i}, like HF
    if cache is None:
      x = stack(x, L.causal_padding_bias(attention_mask, t))
    else:
      s = cache["k"].shape[3]
      bias = L.cached_causal_bias(attention_mask, t, s, cache_index)
      x, cache = stack(x, bias, cache_index, xs=cache)
    if cfg.has_final_layer_norm:
      x = self.final_layer_norm(x)
    if cfg.has_projections:
      x = self.project_out(x)
    x = L.constrain(x, ACT_AXES)
    return x if cache is None else (x, cache)


class OPTModel(nn.Module):
  config: OPTConfig

  def setup(self):
    self.decoder = OPTDecoder(self.config)

  def embed_tokens(self, input_ids):
    return self.decoder.embed_tokens(input_ids)

  def __call__(self, inputs_embeds, attention_mask=None, position_ids=None, deterministic=True,
               cache=None, cache_index=None):
    return self.decoder(inputs_embeds, attention_mask, position_ids, deterministic, cache,
                        cache_index)


class OPTForCausalLM(nn.Module):
  """HF OPTForCausalLM. `inputs_embeds` live in word_embed_proj_dim space (before project_in)."""
  config: OPTConfig

  def setup(self):
    cfg = self.config
    self.model = OPTModel(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = L.Dense(cfg.vocab_size, axes=("embed", "vocab"), use_bias=False,
                             dtype=L.dtype_of(cfg.dtype), param_dtype=L.dtype_of(cfg.param_dtype),
                             init_std=cfg.init_std)

  def embed_tokens(self, input_ids):
    """= HF `get_input_embeddings()(input_ids)` (before project_in), in config.dtype."""
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
    h = self.model(inputs_embeds, attention_mask, position_ids, deterministic, cache, cache_index)
    if cache is not None:
      h, cache = h
    if self.config.tie_word_embeddings:
      logits = self.model.decoder.embed_tokens.attend(h)
    else:
      logits = self.lm_head(h)
    logits = L.constrain(logits, (L.BATCH, L.LENGTH, "activation_vocab"))
    out = {"logits": logits, "last_hidden_state": h}
    if cache is not None:
      out["cache"] = cache
    return out


# ----------------------------------------------------------------------------------------
# HF name table


def hf_rules(config: OPTConfig) -> list[Rule]:
  """Flax (unrolled) <-> HF `OPTForCausalLM` state-dict names."""
  n = config.num_hidden_layers
  d, p = "model/decoder/", "model.decoder."
  rules = [
      Rule(d + "embed_tokens/embedding", p + "embed_tokens.weight"),
      Rule(d + "embed_positions/embedding", p + "embed_positions.weight"),
  ]
  if config.has_projections:
    rules += [Rule(d + "project_in/kernel", p + "project_in.weight", "linear"),
              Rule(d + "project_out/kernel", p + "project_out.weight", "linear")]
  norms = ["layers_{i}/self_attn_layer_norm", "layers_{i}/final_layer_norm"]
  if config.has_final_layer_norm:
    norms.append("final_layer_norm")
  if config.layer_norm_elementwise_affine:
    for nm in norms:
      k = n if "{i}" in nm else 0
      hf = p + nm.replace("layers_{i}", "layers.{i}").replace("/", ".")
      rules += [Rule(d + nm + "/scale", hf + ".weight", layers=k),
                Rule(d + nm + "/bias", hf + ".bias", layers=k)]
  linears = [f"self_attn/{x}_proj" for x in ("q", "k", "v", "out")] + ["fc1", "fc2"]
  for lin in linears:
    hf = p + "layers.{i}." + lin.replace("/", ".")
    rules.append(Rule(d + "layers_{i}/" + lin + "/kernel", hf + ".weight", "linear", layers=n))
    if config.enable_bias:
      rules.append(Rule(d + "layers_{i}/" + lin + "/bias", hf + ".bias", layers=n))
  if not config.tie_word_embeddings:
    rules.append(Rule("lm_head/kernel", "lm_head.weight", "linear"))
  return rules


# lm_head.weight may be saved alongside a tied embedding; it is the same tensor then.
HF_IGNORE: list[str] = [r"lm_head\.weight"]
