"""T5 / FlanT5 encoder-decoder (HF `T5ForConditionalGeneration`) in Flax linen.

Parameter tree (unrolled; scanned trees hold `layers` instead of `layers_{i}`):
  shared/embedding                                  shared.weight
  encoder/relative_attention_bias/embedding         encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
  encoder/block/layers_{i}/SelfAttention/{q,k,v,o}  encoder.block.{i}.layer.0.SelfAttention.*
  encoder/block/layers_{i}/self_attention_norm      encoder.block.{i}.layer.0.layer_norm
  encoder/block/layers_{i}/DenseReluDense/{wi|wi_0,wi_1,wo}, ff_norm
  encoder/final_layer_norm
  decoder/...  (plus EncDecAttention and cross_attention_norm = layer.1; FFN = layer.2)
  lm_head/kernel                                    lm_head.weight (untied heads only)
The stacked layers live under `block` (HF's name) because `LayerStack` owns the
`layers_{i}` scope and needs its own module name; "layers" would clash with the scan axis.

The relative position bias table exists only in layer 0 of each HF stack and its bias is
shared by every layer, so it is computed once per stack here, outside the LayerStack, and
passed to the (homogeneous) layers together with the mask as one additive bias.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from blip2_jax.core.naming import Rule
from blip2_jax.models import layers as L

ACT = (L.BATCH, L.LENGTH, L.EMBED)


@dataclasses.dataclass(frozen=True)
class T5Config(L.Runtime):
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  dense_act_fn: str = "relu"  # what the HF config object ends up with (gated-gelu -> gelu_new)
  is_gated_act: bool = False
  # True: the LM head is `shared` (no lm_head parameter). HF 5.x always ties in the config
  # object and unties only when a checkpoint holds a distinct lm_head.weight; see from_hf.
  tie_word_embeddings: bool = True
  # Multiply the decoder output by d_model**-0.5 before the head (original T5; not T5 v1.1/FlanT5).
  scale_decoder_outputs: bool = True
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0

  @classmethod
  def from_hf(cls, hf_config, tie_word_embeddings: bool | None = None, **runtime) -> "T5Config":
    """From a transformers T5Config (or its dict).

    `tie_word_embeddings`: whether the checkpoint has NO separate lm_head.weight. The HF 5.x
    config object cannot tell (it always says True), so the default follows the pre-5.x
    meaning, `scale_decoder_outputs` (False for T5 v1.1 / FlanT5, whose checkpoints all hold
    an lm_head.weight). `checkpoints.towers.text_config_from_dir` decides it from the checkpoint instead.
    """
    import transformers
    if isinstance(hf_config, dict):
      d = {k: v for k, v in hf_config.items() if k not in ("model_type", "transformers_version")}
      hf_config = transformers.T5Config.from_dict(d)
    get = functools.partial(getattr, hf_config)
    fp = get("feed_forward_proj")
    parts = fp.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"feed_forward_proj {fp!r} is not supported ('ACT' or 'gated-ACT')")
    act = get("dense_act_fn")
    if act not in L.ACTIVATIONS:
      raise ValueError(f"dense_act_fn {act!r} is not supported; known: {sorted(L.ACTIVATIONS)}")
    nb, md = get("relative_attention_num_buckets"), get("relative_attention_max_distance")
    if nb < 4 or md <= nb // 2:
      raise ValueError(f"relative_attention_max_distance {md} must exceed "
                       f"relative_attention_num_buckets // 2 = {nb // 2} (and num_buckets >= 4)")
    if get("is_decoder", False):
      raise ValueError("is_decoder=True (a decoder-only T5) is not supported; "
                       "use the encoder-decoder T5ForConditionalGeneration config")
    scale = getattr(hf_config, "scale_decoder_outputs", get("tie_word_embeddings", True))
    if get("model_type", "t5") == "mt5":
      scale = False  # transformers' MT5 never rescales the decoder output (heads are untied)
    pad = get("pad_token_id")
    start = getattr(hf_config, "decoder_start_token_id", None)
    eos = get("eos_token_id")
    if isinstance(eos, (list, tuple)):
      raise ValueError(f"eos_token_id {eos!r}: a list of eos ids is not supported")
    return cls(
        vocab_size=get("vocab_size"), d_model=get("d_model"), d_kv=get("d_kv"), d_ff=get("d_ff"),
        num_layers=get("num_layers"),
        num_decoder_layers=get("num_decoder_layers") if get("num_decoder_layers") is not None
        else get("num_layers"),
        num_heads=get("num_heads"), relative_attention_num_buckets=nb,
        relative_attention_max_distance=md, dropout_rate=float(get("dropout_rate")),
        layer_norm_epsilon=float(get("layer_norm_epsilon")), feed_forward_proj=fp,
        dense_act_fn=act, is_gated_act=bool(get("is_gated_act")),
        tie_word_embeddings=bool(scale) if tie_word_embeddings is None else bool(tie_word_embeddings),
        scale_decoder_outputs=bool(scale), pad_token_id=0 if pad is None else int(pad),
        eos_token_id=1 if eos is None else int(eos),
        decoder_start_token_id=(0 if pad is None else int(pad)) if start is None else int(start),
        **runtime)

  def to_hf(self):
    """The transformers T5Config. Which head a HF model gets is a checkpoint property in HF 5.x,
    so from_hf(to_hf(c)) == c needs `tie_word_embeddings=c.tie_word_embeddings` when
    c.tie_word_embeddings != c.scale_decoder_outputs."""
    import transformers
    return transformers.T5Config(
        vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
        num_layers=self.num_layers, num_decoder_layers=self.num_decoder_layers,
        num_heads=self.num_heads, relative_attention_num_buckets=self.relative_attention_num_buckets,
        relative_attention_max_distance=self.relative_attention_max_distance,
        dropout_rate=self.dropout_rate, layer_norm_epsilon=self.layer_norm_epsilon,
        feed_forward_proj=self.feed_forward_proj, dense_act_fn=self.dense_act_fn,
        is_gated_act=self.is_gated_act, tie_word_embeddings=self.scale_decoder_outputs,
        pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
        decoder_start_token_id=self.decoder_start_token_id)

  @property
  def hidden_size(self) -> int:
    """HF's alias of d_model (the width the BLIP-2 projection writes)."""
    return self.d_model

  @property
  def weight_std(self) -> float:
    # The std every kernel here but `wo` and the (1.0) embedding/head tables starts from.
    return self.d_model ** -0.5


# ----------------------------------------------------------------------------------------
# relative position buckets


@functools.lru_cache(maxsize=None)
def _bucket_table(bidirectional: bool, num_buckets: int, max_distance: int) -> tuple[np.ndarray, int]:
  """Buckets of relative positions -R..R (HF `_relative_position_bucket`), R = max_distance + 1.

  Every |relative position| >= max_distance lands in the last bucket of its side, so a table
  over -R..R plus clipping covers any length (and traced cache offsets). Built on the host in
  float32 numpy, op for op as torch does, so bucket edges fall where HF puts them.
  """
  r = max_distance + 1
  rel = np.arange(-r, r + 1, dtype=np.int64)
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0).astype(np.int64) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):
    large = np.log(rel.astype(np.float32) / np.float32(max_exact))
  large = large / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
  large = max_exact + np.where(is_small, 0, large).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  buckets += np.where(is_small, rel, large)
  return buckets.astype(np.int32), r


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int,
                             max_distance: int):
  """jnp version of HF's bucketing (any int array, traced values allowed)."""
  table, r = _bucket_table(bidirectional, num_buckets, max_distance)
  return jnp.asarray(table)[jnp.clip(relative_position, -r, r) + r]


def shift_right(labels, decoder_start_token_id: int, pad_token_id: int):
  """HF `_shift_right`: prepend the start token, drop the last label, -100 -> pad."""
  labels = jnp.asarray(labels)
  start = jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype)
  shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
  return jnp.where(shifted == -100, pad_token_id, shifted)


# ----------------------------------------------------------------------------------------
# modules


def _norm(cfg: T5Config, name: str) -> L.LayerNorm:
  # T5 RMSNorm: no mean, no bias; HF casts to the weight dtype before scaling (LayerNorm does).
  return L.norm(cfg, name, eps=cfg.layer_norm_epsilon, rms=True)


class T5Attention(nn.Module):
  """Self- or cross-attention without score scaling; `bias` holds position bias + mask.

  The one place decoder keys/values are formed. With `cache` ({"k", "v"}: head-major
  (B, N, S, H)) it returns (out, new cache): self-attention writes the new keys/values at slots
  cache_index..; cross-attention (cache_index None) projects `kv` into a fresh cache, or, with kv
  None, reuses the cached encoder keys/values.
  """
  config: T5Config

  @nn.compact
  def __call__(self, x, kv=None, bias=None, cache=None, cache_index=None):
    cfg = self.config
    inner = cfg.num_heads * cfg.d_kv
    dense = functools.partial(L.dense, cfg, use_bias=False)
    q = L.split_heads(dense(inner, ("embed", "heads"), name="q")(x), cfg.num_heads)
    if cache is not None and cache_index is None and kv is None:
      k, v = cache["k"], cache["v"]  # cross-attention K/V computed once from the encoder
    else:
      kv = x if kv is None else kv
      k = L.split_heads(dense(inner, ("embed", "heads"), name="k")(kv), cfg.num_heads)
      v = L.split_heads(dense(inner, ("embed", "heads"), name="v")(kv), cfg.num_heads)
      if cache is not None and cache_index is not None:
        k = L.cache_update(cache["k"], k, cache_index)
        v = L.cache_update(cache["v"], v, cache_index)
      elif cache is not None:  # fresh cross-attention cache, head-major like the others
        k, v = (jnp.swapaxes(t, 1, 2).astype(cache["k"].dtype) for t in (k, v))
    if cache is None:
      out = L.attention(q, k, v, bias=bias, scale=1.0, implementation=cfg.attn_impl,
                        dtype=cfg.jdtype)
    else:
      out = L.cached_attention(q, k, v, bias=bias, scale=1.0, dtype=cfg.jdtype)
    out = dense(cfg.d_model, ("heads", "embed"), name="o")(L.merge_heads(out))
    if cache is None:
      return out
    return out, {"k": k, "v": v}


class T5FeedForward(nn.Module):
  """T5DenseActDense (wi) or T5DenseGatedActDense (act(wi_0 x) * wi_1 x)."""
  config: T5Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = functools.partial(L.dense, cfg, use_bias=False)
    act = L.activation(cfg.dense_act_fn)
    if cfg.is_gated_act:
      h = act(dense(cfg.d_ff, ("embed", "mlp"), name="wi_0")(x))
      h = h * dense(cfg.d_ff, ("embed", "mlp"), name="wi_1")(x)
    else:
      h = act(dense(cfg.d_ff, ("embed", "mlp"), name="wi")(x))
    h = L.constrain(h, (L.BATCH, L.LENGTH, "activation_mlp"))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
    return dense(cfg.d_model, ("mlp", "embed"), name="wo", init_std=cfg.d_ff ** -0.5)(h)


class T5Block(nn.Module):
  """One pre-norm T5 block: self-attention, [cross-attention], feed-forward."""
  config: T5Config
  is_decoder: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, self_bias, encoder_hidden_states=None, cross_bias=None, cache_index=None,
               cache=None):
    """With a per-layer decoder `cache` {"k", "v", "ck", "cv"} returns (x, new cache); the
    cross-attention K/V ("ck", "cv") are recomputed only when encoder_hidden_states is given."""
    cfg = self.config
    drop = lambda h: nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
    self_cache = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    h = T5Attention(cfg, name="SelfAttention")(_norm(cfg, "self_attention_norm")(x), bias=self_bias,
                                               cache=self_cache, cache_index=cache_index)
    if cache is not None:
      h, self_cache = h
    x = L.constrain(x + drop(h), ACT)
    if self.is_decoder:
      cross_cache = None if cache is None else {"k": cache["ck"], "v": cache["cv"]}
      h = T5Attention(cfg, name="EncDecAttention")(
          _norm(cfg, "cross_attention_norm")(x), kv=encoder_hidden_states, bias=cross_bias,
          cache=cross_cache)
      if cache is not None:
        h, cross_cache = h
      x = L.constrain(x + drop(h), ACT)
    h = T5FeedForward(cfg, self.deterministic, name="DenseReluDense")(_norm(cfg, "ff_norm")(x))
    x = L.constrain(x + drop(h), ACT)
    if cache is None:
      return x
    return x, {"k": self_cache["k"], "v": self_cache["v"], "ck": cross_cache["k"],
               "cv": cross_cache["v"]}


def position_bias(table: L.Embed, q_len: int, k_len: int, *, bidirectional: bool,
                  config: T5Config, offset=0):
  """(1, N, q_len, k_len) float32 bias; queries sit at positions offset..offset+q_len-1."""
  ctx = jnp.arange(q_len)[:, None] + offset
  mem = jnp.arange(k_len)[None, :]
  buckets = relative_position_bucket(
      mem - ctx, bidirectional=bidirectional, num_buckets=config.relative_attention_num_buckets,
      max_distance=config.relative_attention_max_distance)
  return jnp.transpose(table(buckets), (2, 0, 1))[None].astype(jnp.float32)


class T5Stack(nn.Module):
  """Encoder or decoder stack over input embeddings (the embedding table lives in the parent)."""
  config: T5Config
  is_decoder: bool = False

  @nn.compact
  def __call__(self, x, self_mask, encoder_hidden_states=None, cross_mask=None,
               deterministic: bool = True, cache=None, cache_index=None):
    """`self_mask` bool (B|1, 1|T, S), True = keep; `cross_mask` bool (B, S_enc).

    Cached decoding (decoder only, `cache` from init_cache with S slots): the T inputs sit at
    slots cache_index..cache_index+T-1, `self_mask` is None or (B, S) over slots, and the
    result is (x, new cache); encoder_hidden_states None reuses the cached cross K/V."""
    cfg = self.config
    table = L.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=jnp.float32,
                    param_dtype=cfg.jparam_dtype, init_std=cfg.d_model ** -0.5,
                    axes=("relpos", None), name="relative_attention_bias")
    t = x.shape[1]
    if cache is not None:
      s = cache["k"].shape[3]
      # HF: the bias of the full key length, its last T query rows (queries at cache_index..).
      bias = position_bias(table, t, s, bidirectional=False, config=cfg, offset=cache_index)
      bias = bias + L.cached_causal_bias(self_mask, t, s, cache_index)
    else:
      # Computed once: HF's layer 0 owns the table and every later layer reuses its bias.
      bias = position_bias(table, t, t, bidirectional=not self.is_decoder, config=cfg)
    if self_mask is not None and cache is None:
      bias = bias + L.mask_to_bias(self_mask)[:, None]
    x = L.constrain(x, ACT)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    args = (bias,)
    if self.is_decoder:
      # HF's cross-attention "position bias" is zeros: only the encoder padding mask remains.
      cross_bias = None
      if cross_mask is not None:
        cross_bias = L.mask_to_bias(cross_mask)[:, None, None, :]  # layers.attention expands it for cuDNN
      args = (bias, encoder_hidden_states, cross_bias)
    n = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
    stack = L.LayerStack(T5Block, {"config": cfg, "is_decoder": self.is_decoder,
                                   "deterministic": deterministic},
                         n, scan=cfg.scan, remat=cfg.remat, name="block")
    if cache is None:
      x = stack(x, *args)
    else:
      x, cache = stack(x, *args, cache_index, xs=cache)
    x = _norm(cfg, "final_layer_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    return x if cache is None else (x, cache)


def init_cache(config: T5Config, batch: int, max_length: int, encoder_length: int,
               dtype=None) -> dict:
  """Empty decoder cache, head-major: self-attention "k", "v" (layers, batch, heads, max_length,
  d_kv) and cross-attention "ck", "cv" (layers, batch, heads, encoder_length, d_kv)."""
  dt = L.dtype_of(dtype or config.dtype)
  n, h, d = config.num_decoder_layers, config.num_heads, config.d_kv
  self_shape, cross_shape = (n, batch, h, max_length, d), (n, batch, h, encoder_length, d)
  return {"k": jnp.zeros(self_shape, dt), "v": jnp.zeros(self_shape, dt),
          "ck": jnp.zeros(cross_shape, dt), "cv": jnp.zeros(cross_shape, dt)}


class T5ForConditionalGeneration(nn.Module):
  """HF T5ForConditionalGeneration; methods embed_tokens / encode / decode for BLIP-2."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared = L.embed(cfg, cfg.vocab_size, cfg.d_model, init_std=1.0)
    self.encoder = T5Stack(cfg, is_decoder=False)
    self.decoder = T5Stack(cfg, is_decoder=True)
    if not cfg.tie_word_embeddings:
      self.lm_head = L.dense(cfg, cfg.vocab_size, ("embed", "vocab"), use_bias=False, init_std=1.0)

  def embed_tokens(self, ids):
    return self.shared(ids)

  def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None,
             deterministic: bool = True):
    """Encoder last hidden state (B, S, d_model); `attention_mask` (B, S) 1 = keep."""
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    x = self.shared(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.config.jdtype)
    mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, :]
    return self.encoder(x, mask, deterministic=deterministic)

  def decode(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask=None,
             decoder_attention_mask=None, deterministic: bool = True, cache=None,
             cache_index=None):
    """Decoder pass over the full target (causal + padding) -> dict(logits, last_hidden_state).

    Cached decoding: `cache` (init_cache) and `cache_index` (int32 scalar, may be traced) put
    the inputs at slots cache_index..; `decoder_attention_mask` is None or (B, S) over slots;
    pass encoder_hidden_states on the first call (fills the cross K/V) and None afterwards.
    The result then also holds "cache"."""
    if cache is not None:
      cross = None if encoder_attention_mask is None else encoder_attention_mask.astype(bool)
      h, cache = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask,
                              encoder_hidden_states, cross, deterministic=deterministic,
                              cache=cache, cache_index=cache_index)
      return {"logits": self.logits(h), "last_hidden_state": h, "cache": cache}
    t = decoder_input_ids.shape[1]
    keep = jnp.tril(jnp.ones((t, t), bool))[None]  # (1, T, T)
    if decoder_attention_mask is not None:
      keep = keep & decoder_attention_mask.astype(bool)[:, None, :]
    cross = None if encoder_attention_mask is None else encoder_attention_mask.astype(bool)
    h = self.decoder(self.shared(decoder_input_ids), keep, encoder_hidden_states, cross,
                     deterministic=deterministic)
    return {"logits": self.logits(h), "last_hidden_state": h}

  def logits(self, h):
    cfg = self.config
    if cfg.scale_decoder_outputs:
      h = h * (cfg.d_model ** -0.5)
    if cfg.tie_word_embeddings:
      out = self.shared.attend(h)
    else:
      out = self.lm_head(h)
    return L.constrain(out, (L.BATCH, L.LENGTH, "activation_vocab"))

  def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None, *, inputs_embeds=None, labels=None,
               deterministic: bool = True):
    """-> dict(logits (B, T, V), encoder_last_hidden_state, [loss]) as HF's forward.

    With `labels` and no `decoder_input_ids` the decoder input is `shift_right(labels)`;
    the loss is the mean cross-entropy over labels != -100 (float32).
    """
    cfg = self.config
    enc = self.encode(input_ids, attention_mask, inputs_embeds, deterministic=deterministic)
    if decoder_input_ids is None:
      if labels is None:
        raise ValueError("pass decoder_input_ids or labels")
      decoder_input_ids = shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id)
    out = self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask,
                      deterministic=deterministic)
    result = {"logits": out["logits"], "encoder_last_hidden_state": enc}
    if labels is not None:
      result["loss"] = L.cross_entropy(out["logits"], labels)
    return result


# ----------------------------------------------------------------------------------------
# HF name table

def hf_ignore(config: T5Config) -> list[str]:
  """HF keys that may be present without a rule: tied copies of shared.weight (old .bin files
  hold them; save_pretrained drops them), the never-used cross-attention bias table HF itself
  ignores on load, and lm_head.weight for tied heads only (for an untied model a distinct
  lm_head must never be skipped)."""
  out = [r"encoder\.embed_tokens\.weight", r"decoder\.embed_tokens\.weight",
         r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"]
  return out + ([r"lm_head\.weight"] if config.tie_word_embeddings else [])


def _stack_rules(config: T5Config, decoder: bool) -> list[Rule]:
  side = "decoder" if decoder else "encoder"
  n = config.num_decoder_layers if decoder else config.num_layers
  f, h = f"{side}/block/layers_{{i}}/", f"{side}.block.{{i}}.layer."
  rules = [Rule(f"{side}/relative_attention_bias/embedding",
                f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
           Rule(f"{side}/final_layer_norm/scale", f"{side}.final_layer_norm.weight")]
  subs = [("SelfAttention", "0.SelfAttention"), ("self_attention_norm", "0.layer_norm")]
  ff = "1"
  if decoder:
    subs += [("EncDecAttention", "1.EncDecAttention"), ("cross_attention_norm", "1.layer_norm")]
    ff = "2"
  subs += [("ff_norm", f"{ff}.layer_norm")]
  for fl, hl in subs:
    if fl.endswith("norm"):
      rules.append(Rule(f + fl + "/scale", h + hl + ".weight", layers=n))
    else:
      rules += [Rule(f"{f}{fl}/{p}/kernel", f"{h}{hl}.{p}.weight", "linear", layers=n)
                for p in "qkvo"]
  mlp = ["wi_0", "wi_1", "wo"] if config.is_gated_act else ["wi", "wo"]
  rules += [Rule(f"{f}DenseReluDense/{p}/kernel", f"{h}{ff}.DenseReluDense.{p}.weight", "linear",
                 layers=n) for p in mlp]
  return rules


def hf_rules(config: T5Config) -> list[Rule]:
  """Flax <-> HF names, keys relative to T5ForConditionalGeneration."""
  rules = [Rule("shared/embedding", "shared.weight")]
  rules += _stack_rules(config, decoder=False) + _stack_rules(config, decoder=True)
  if not config.tie_word_embeddings:
    rules.append(Rule("lm_head/kernel", "lm_head.weight", "linear"))
  return rules
