"""OPT decoder-only language model (HF `OPTForCausalLM`), Flax linen.

Parameter tree (unrolled), mirroring HF names:
  model/decoder/embed_tokens/embedding          (vocab, word_embed_proj_dim)
  model/decoder/embed_positions/embedding       (max_position_embeddings + 2, hidden)
  model/decoder/project_in/kernel, project_out/kernel   (only if word_embed_proj_dim != hidden)
  model/decoder/layers_{i}/self_attn/{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm
  model/decoder/final_layer_norm                (pre-LN models only)
  lm_head/kernel                                (untied models only)
The head, the input handling and the cache plumbing are `causal_lm`'s.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax.core.naming import Rule
from blip2_jax.models import causal_lm
from blip2_jax.models import layers as L

ACT_AXES = (L.BATCH, L.LENGTH, L.EMBED)
POS_OFFSET = 2  # OPTLearnedPositionalEmbedding: fairseq reserves ids 0, 1
LN_EPS = 1e-5  # torch nn.LayerNorm default; OPT has no config field for it


@dataclasses.dataclass(frozen=True)
class OPTConfig(L.Runtime):
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

  def __post_init__(self):
    super().__post_init__()
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
  def weight_std(self) -> float:
    return self.init_std

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
  return L.norm(cfg, name, eps=LN_EPS, affine=cfg.layer_norm_elementwise_affine)


class OPTAttention(nn.Module):
  config: OPTConfig

  def setup(self):
    cfg = self.config
    d = cfg.hidden_size
    self.q_proj = L.dense(cfg, d, ("embed", "heads"), "q_proj", use_bias=cfg.enable_bias)
    self.k_proj = L.dense(cfg, d, ("embed", "heads"), "k_proj", use_bias=cfg.enable_bias)
    self.v_proj = L.dense(cfg, d, ("embed", "heads"), "v_proj", use_bias=cfg.enable_bias)
    self.out_proj = L.dense(cfg, d, ("heads", "embed"), "out_proj", use_bias=cfg.enable_bias)

  def __call__(self, x, bias, cache_index=None, cache=None):
    """-> out, or (out, new cache) with a per-layer `cache` (see causal_lm.self_attention)."""
    cfg = self.config
    # HF scales q right after the projection and calls attention with scaling 1.0.
    q = self.q_proj(x) * (cfg.head_dim ** -0.5)
    q, k, v = (L.split_heads(t, cfg.num_attention_heads) for t in (q, self.k_proj(x), self.v_proj(x)))
    out, cache = causal_lm.self_attention(q, k, v, bias, scale=1.0, config=cfg, cache=cache,
                                          cache_index=cache_index)
    out = self.out_proj(L.merge_heads(out))
    return out if cache is None else (out, cache)


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
    h = L.dense(cfg, cfg.ffn_dim, ("embed", "mlp"), "fc1", use_bias=cfg.enable_bias)(h)
    h = L.constrain(L.activation(cfg.activation_function)(h), (L.BATCH, L.LENGTH, "activation_mlp"))
    h = L.dense(cfg, cfg.hidden_size, ("mlp", "embed"), "fc2", use_bias=cfg.enable_bias)(h)
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
  return causal_lm.init_cache(config.num_hidden_layers, config.num_attention_heads,
                              config.head_dim, batch, max_length, dtype or config.dtype)


class OPTDecoder(nn.Module):
  config: OPTConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = L.embed(cfg, cfg.vocab_size, cfg.word_embed_proj_dim)
    self.embed_positions = L.embed(cfg, cfg.max_position_embeddings + POS_OFFSET, cfg.hidden_size,
                                   axes=("pos", "embed"))
    if cfg.has_projections:
      self.project_in = L.dense(cfg, cfg.hidden_size, (None, "embed"), "project_in", use_bias=False)
      self.project_out = L.dense(cfg, cfg.word_embed_proj_dim, ("embed", None), "project_out",
                                 use_bias=False)
    if cfg.has_final_layer_norm:
      self.final_layer_norm = _norm(cfg, "final_layer_norm")

  @nn.compact
  def __call__(self, inputs_embeds, attention_mask=None, position_ids=None, *, deterministic=True,
               cache=None, cache_index=None):
    """-> (hidden, new cache or None); masks and cache as `causal_lm.run_layers`."""
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
    x = inputs_embeds.astype(cfg.jdtype)
    if cfg.has_projections:
      x = self.project_in(x)
    x = L.constrain(x + pos, ACT_AXES)
    x, cache = causal_lm.run_layers(self, OPTDecoderLayer,
                                    {"config": cfg, "deterministic": deterministic}, x,
                                    attention_mask, cache=cache, cache_index=cache_index)
    if cfg.has_final_layer_norm:
      x = self.final_layer_norm(x)
    if cfg.has_projections:
      x = self.project_out(x)
    return L.constrain(x, ACT_AXES), cache


class OPTModel(nn.Module):
  """HF OPTModel: the decoder under `decoder/`."""
  config: OPTConfig

  def setup(self):
    self.decoder = OPTDecoder(self.config)

  def embed_tokens(self, input_ids):
    return self.decoder.embed_tokens(input_ids)

  def attend(self, h):
    return self.decoder.embed_tokens.attend(h)

  def __call__(self, inputs_embeds, attention_mask=None, position_ids=None, **kw):
    return self.decoder(inputs_embeds, attention_mask, position_ids, **kw)


class OPTForCausalLM(causal_lm.CausalLM):
  """HF OPTForCausalLM. `inputs_embeds` live in word_embed_proj_dim space (before project_in)."""
  config: OPTConfig
  model_cls = OPTModel


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


def hf_ignore(config: OPTConfig) -> list[str]:
  """HF keys that may be present without a rule: lm_head.weight may be saved alongside a tied
  embedding (the same tensor then)."""
  return [r"lm_head\.weight"]
