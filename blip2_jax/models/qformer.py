"""BLIP-2 / InstructBLIP Q-Former (HF `Blip2QFormerModel`, `InstructBlipQFormerModel`) in Flax.

Where the text embeddings live (`QFormerConfig.layout`):
  "blip2"        HF Blip2: word + position embeddings are NOT part of `qformer`; composites
                 (Blip2ForImageTextRetrieval, Blip2TextModelWithProjection) own them at top-level
                 `embeddings.*` (`Blip2TextEmbeddings`) and the qformer owns `layernorm`, applied to
                 the concatenation [queries; text]. Here: `QFormerTextEmbeddings` (word + position,
                 no norm) + `QFormerModel(query_embeds, text_embeds=...)`; `QFormerWithEmbeddings`
                 mounts both as `embeddings/...` + `qformer/...` (= HF keys `embeddings.*`,
                 `qformer.*`) and takes `input_ids`. `QFormerModel` itself rejects `input_ids` here.
  "instructblip" HF InstructBLIP: `qformer.embeddings.{word_embeddings,position_embeddings,
                 layernorm}`; `QFormerModel(query_embeds, input_ids=...)` embeds the text itself.

Parameter names (unrolled), HF `encoder.layer.{i}` with g = i // freq, j = i % freq:
  encoder/layers_{g}/layer_{j}/attention/attention/{query,key,value}/{kernel,bias}
  encoder/layers_{g}/layer_{j}/attention/output/{dense/{kernel,bias},LayerNorm/{scale,bias}}
  encoder/layers_{g}/layer_0/crossattention/...           (cross-attention: first layer of a group)
  encoder/layers_{g}/layer_{j}/{intermediate,output}/...  (text FFN, if use_qformer_text_input)
  encoder/layers_{g}/layer_{j}/{intermediate_query,output_query}/...  (query FFN)
The LayerStack unit is a group of `cross_attention_frequency` layers, so scan=True (params under
`encoder/layers/layer_{j}/...` with a leading group axis) needs num_hidden_layers % freq == 0; the
unrolled stack also handles a shorter last group.

Masks: `attention_mask` is a keep-mask (1/True = attend) of shape (B, S) over [queries; text] or
(B, T, S). `itm_mask`, `itg_mask` (UniLM) build the stage-1 masks; ITC's text pass is
`query_embeds=None` with the plain text mask. A single pass with `itg_mask` equals LAVIS's ITG
(query pass cached, then text with past_key_values): queries never see text, so their states and
K/V are the same in both.

All params are created at init whatever inputs are given (unused branches run on dummies).

The BERT blocks here (attention, output, intermediate, embeddings, the `cls.predictions` head and
their name-table helpers) also build BLIP's text model (models/blip.py); for its decoding, the
attention takes key / value caches and lets several query rows share one image's keys / values
(`QFormerMultiHeadAttention`). Without those arguments it computes exactly what it did before.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax.core.naming import Rule, prefixed
from blip2_jax.models import layers as L

ACT = (L.BATCH, L.LENGTH, L.EMBED)
LAYOUTS = ("blip2", "instructblip")
_HF_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "hidden_act", "hidden_dropout_prob",
              "attention_probs_dropout_prob", "max_position_embeddings", "initializer_range",
              "layer_norm_eps", "pad_token_id", "cross_attention_frequency", "encoder_hidden_size")


# ----------------------------------------------------------------------------------------
# config


@dataclasses.dataclass(frozen=True)
class QFormerConfig(L.Runtime):
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: int | None = 0
  cross_attention_frequency: int = 2
  encoder_hidden_size: int = 1408
  use_qformer_text_input: bool = False
  layout: str = "blip2"  # "blip2" | "instructblip" (where the text embeddings live, see top)

  def __post_init__(self):
    super().__post_init__()
    if self.layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
    if self.layout == "instructblip" and not self.use_qformer_text_input:
      raise ValueError("use_qformer_text_input must be True for the instructblip layout "
                       "(its layers always have the text FFN)")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.cross_attention_frequency < 1:
      raise ValueError("cross_attention_frequency must be >= 1")
    if self.scan and self.num_hidden_layers % self.cross_attention_frequency:
      raise ValueError(f"scan=True needs num_hidden_layers ({self.num_hidden_layers}) divisible "
                       f"by cross_attention_frequency ({self.cross_attention_frequency}); "
                       "use scan=False")
    L.activation(self.hidden_act)

  @property
  def has_text_ffn(self) -> bool:
    return self.use_qformer_text_input or self.layout == "instructblip"

  @classmethod
  def from_hf(cls, hf_config, **runtime) -> "QFormerConfig":
    """Blip2QFormerConfig / InstructBlipQFormerConfig (object or dict; a full Blip2Config or
    InstructBlipConfig is reduced to its qformer_config)."""
    import transformers as T
    if not isinstance(hf_config, dict) and hasattr(hf_config, "qformer_config"):
      hf_config = hf_config.qformer_config
    if isinstance(hf_config, dict):
      d = dict(hf_config)
      if "qformer_config" in d:
        d = dict(d["qformer_config"])
      mt = d.get("model_type", "blip_2_qformer")
      klass = T.InstructBlipQFormerConfig if mt == "instructblip_qformer" else T.Blip2QFormerConfig
      hf_config = klass.from_dict({k: v for k, v in d.items() if k != "model_type"})
    mt = getattr(hf_config, "model_type", "")
    if mt not in ("blip_2_qformer", "instructblip_qformer"):
      raise ValueError(f"model_type {mt!r} is not a BLIP-2/InstructBLIP Q-Former config")
    get = lambda k, default=None: getattr(hf_config, k, default)
    if get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"position_embedding_type={get('position_embedding_type')!r} is not "
                       "supported (only 'absolute')")
    if not isinstance(get("hidden_act"), str) or get("hidden_act") not in L.ACTIVATIONS:
      raise ValueError(f"hidden_act={get('hidden_act')!r} is not supported")
    if get("is_decoder", False) or get("add_cross_attention", False):
      raise ValueError("is_decoder / add_cross_attention are not supported")
    instruct = mt == "instructblip_qformer"
    kw = {k: get(k) for k in _HF_FIELDS}
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
      kw[k] = float(kw[k])
    text = True if instruct else bool(get("use_qformer_text_input"))
    return cls(**kw, use_qformer_text_input=text, layout="instructblip" if instruct else "blip2",
               **runtime)

  def to_hf(self):
    import transformers as T
    kw = {k: getattr(self, k) for k in _HF_FIELDS}
    if self.layout == "instructblip":
      return T.InstructBlipQFormerConfig(**kw)
    return T.Blip2QFormerConfig(**kw, use_qformer_text_input=self.use_qformer_text_input)

  @classmethod
  def from_bert(cls, bert_config, *, encoder_hidden_size: int = 1408,
                cross_attention_frequency: int = 2, add_dec_token: bool = True,
                layout: str = "blip2", **runtime) -> "QFormerConfig":
    """The Q-Former BLIP-2 builds on a BERT config (vocab + 1 for `[DEC]`, text FFN on)."""
    if not isinstance(bert_config, dict):
      bert_config = bert_config.to_dict()
    if bert_config.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError("position_embedding_type must be 'absolute'")
    kw = {k: bert_config[k] for k in _HF_FIELDS[:-2] if k in bert_config}
    kw["vocab_size"] += int(add_dec_token)
    return cls(**kw, cross_attention_frequency=cross_attention_frequency,
               encoder_hidden_size=encoder_hidden_size, use_qformer_text_input=True,
               layout=layout, **runtime)


# ----------------------------------------------------------------------------------------
# masks (1/True = keep)


def itm_mask(query_len: int, text_mask) -> jax.Array:
  """(B, Q + T) bidirectional keep-mask for [queries; text] (ITM, InstructBLIP)."""
  text_mask = jnp.asarray(text_mask).astype(bool)
  return jnp.concatenate([jnp.ones((text_mask.shape[0], query_len), bool), text_mask], axis=1)


def itc_text_mask(text_mask) -> jax.Array:
  """ITC text pass: no queries (call with query_embeds=None), the plain (B, T) text mask."""
  return jnp.asarray(text_mask).astype(bool)


def itg_mask(query_len: int, text_mask) -> jax.Array:
  """(B, Q + T, Q + T) UniLM keep-mask (LAVIS `get_extended_attention_mask`, is_decoder + query):
  queries see all queries only; text sees all queries and text causally; padded keys dropped."""
  text_mask = jnp.asarray(text_mask).astype(bool)
  b, t = text_mask.shape
  s = query_len + t
  i = jnp.arange(s)[:, None]
  j = jnp.arange(s)[None, :]
  base = (j < query_len) | ((i >= query_len) & (j <= i))
  keys = itm_mask(query_len, text_mask)
  return base[None] & keys[:, None, :]


# ----------------------------------------------------------------------------------------
# modules


def _norm(cfg, name):
  return L.norm(cfg, name, eps=cfg.layer_norm_eps)


class QFormerMultiHeadAttention(nn.Module):
  """query/key/value projections + attention core (HF `...attention.attention`).

  BLIP's text decoder (models/blip.py) decodes with caches, head-major {"k", "v"}: (B, N, S, H)
  (`layers.cache_update`), returned as (out, new cache): with `cache_index` the keys / values of
  `x` go to slots cache_index.. (self-attention); without it, cross-attention keys / values are
  projected from `kv` into a fresh cache or, `kv` None, read from `cache`. Cross-attention keys /
  values may have fewer rows than `x`: G = rows(x) / rows(kv) consecutive rows of `x` share one
  key / value row (an image and its G captions), projected once."""
  config: QFormerConfig
  cross: bool = False

  @nn.compact
  def __call__(self, x, bias, kv=None, deterministic=True, cache=None, cache_index=None):
    cfg = self.config
    dt = cfg.jdtype
    q = L.split_heads(L.dense(cfg, cfg.hidden_size, ("embed", "heads"), "query")(x), cfg.num_attention_heads)
    if cache is not None:
      return self._cached(q, x, kv, bias, cache, cache_index)
    k, v = self._key_value(x if kv is None else kv)
    train = not deterministic and cfg.attention_probs_dropout_prob > 0.0
    attend = lambda q: L.attention(q, k, v, bias=bias, implementation=cfg.attn_impl, dtype=dt,
                                   dropout_rate=cfg.attention_probs_dropout_prob if train else 0.0,
                                   dropout_rng=self.make_rng("dropout") if train else None)
    return L.merge_heads(_shared_rows(attend, q, k.shape[0]))

  def _key_value(self, src):
    cfg = self.config
    return tuple(L.split_heads(L.dense(cfg, cfg.hidden_size, ("embed", "heads"), name)(src),
                               cfg.num_attention_heads) for name in ("key", "value"))

  def _cached(self, q, x, kv, bias, cache, cache_index):
    if cache_index is not None:  # self-attention: this step's keys / values into their slots
      k, v = self._key_value(x)
      k, v = L.cache_update(cache["k"], k, cache_index), L.cache_update(cache["v"], v, cache_index)
    elif kv is not None:  # cross-attention, first call: a fresh head-major cache
      k, v = (jnp.swapaxes(t, 1, 2) for t in self._key_value(kv))
    else:  # cross-attention keys / values projected once
      k, v = cache["k"], cache["v"]
    attend = lambda q: L.cached_attention(q, k, v, bias=bias, dtype=self.config.jdtype)
    return L.merge_heads(_shared_rows(attend, q, k.shape[0])), {"k": k, "v": v}


def _shared_rows(attend, q, kv_rows: int):
  """attend(q) where G = rows(q) / kv_rows consecutive query rows share one key / value row: their
  queries are laid side by side in that row ((B*G, T, ...) -> (B, G*T, ...)); rows never see each
  other, since every query attends to the keys alone."""
  rows, t = q.shape[:2]
  if rows == kv_rows:
    return attend(q)
  if rows % kv_rows:
    raise ValueError(f"{rows} query rows cannot share {kv_rows} key / value rows")
  out = attend(q.reshape(kv_rows, rows // kv_rows * t, *q.shape[2:]))
  return out.reshape(rows, t, *out.shape[2:])


class QFormerSelfOutput(nn.Module):
  """dense + dropout + residual LayerNorm (HF `...output` of attention, and of the FFN)."""
  config: QFormerConfig
  axes: tuple[str, str] = ("heads", "embed")

  @nn.compact
  def __call__(self, h, residual, deterministic=True):
    cfg = self.config
    h = L.dense(cfg, cfg.hidden_size, self.axes, "dense")(h)
    h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
    return _norm(cfg, "LayerNorm")(h + residual)


class QFormerAttention(nn.Module):
  """Attention + output; with `cache` (see QFormerMultiHeadAttention) -> (out, new cache)."""
  config: QFormerConfig
  cross: bool = False

  @nn.compact
  def __call__(self, x, bias, kv=None, deterministic=True, cache=None, cache_index=None):
    h = QFormerMultiHeadAttention(self.config, self.cross, name="attention")(
        x, bias, kv, deterministic, cache, cache_index)
    h, new_cache = h if cache is not None else (h, None)
    out = QFormerSelfOutput(self.config, name="output")(h, x, deterministic)
    return out if cache is None else (out, new_cache)


class QFormerIntermediate(nn.Module):
  config: QFormerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = L.dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "dense")(x)
    return L.constrain(L.activation(cfg.hidden_act)(h), (L.BATCH, L.LENGTH, "activation_mlp"))


class QFormerLayer(nn.Module):
  """One Q-Former layer; query positions are the first `query_length` of the sequence."""
  config: QFormerConfig
  has_cross: bool
  query_length: int = 0
  deterministic: bool = True

  def _ffn(self, x, suffix):
    h = QFormerIntermediate(self.config, name=f"intermediate{suffix}")(x)
    return QFormerSelfOutput(self.config, ("mlp", "embed"), name=f"output{suffix}")(
        h, x, self.deterministic)

  @nn.compact
  def __call__(self, x, bias, enc, enc_bias):
    cfg, ql, det = self.config, self.query_length, self.deterministic
    att = QFormerAttention(cfg, name="attention")(x, bias, None, det)
    used = set()
    if ql > 0:
      q = att[:, :ql]
      if self.has_cross:
        if enc is None:
          raise ValueError("encoder_hidden_states must be given for cross-attention layers")
        q = QFormerAttention(cfg, cross=True, name="crossattention")(q, enc_bias, enc, det)
        used.add("cross")
      out = self._ffn(q, "_query")
      used.add("query")
      if att.shape[1] > ql:
        if not cfg.has_text_ffn:
          raise ValueError("text tokens need use_qformer_text_input=True (no text FFN)")
        out = jnp.concatenate([out, self._ffn(att[:, ql:], "")], axis=1)
        used.add("text")
    else:
      if not cfg.has_text_ffn:
        raise ValueError("a text-only pass needs use_qformer_text_input=True (no text FFN)")
      out = self._ffn(att, "")
      used.add("text")
    if self.is_initializing():  # create the params of branches this input did not use
      dummy = jnp.zeros((1, 1, cfg.hidden_size), cfg.jdtype)
      if self.has_cross and "cross" not in used:
        QFormerAttention(cfg, cross=True, name="crossattention")(
            dummy, None, jnp.zeros((1, 1, cfg.encoder_hidden_size), dummy.dtype), True)
      if "query" not in used:
        self._ffn(dummy, "_query")
      if cfg.has_text_ffn and "text" not in used:
        self._ffn(dummy, "")
    return L.constrain(out, ACT)


class QFormerGroup(nn.Module):
  """The LayerStack unit: `num_layers` layers, cross-attention in the first one."""
  config: QFormerConfig
  num_layers: int
  query_length: int = 0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, bias, enc, enc_bias):
    for j in range(self.num_layers):
      x = QFormerLayer(self.config, j == 0, self.query_length, self.deterministic,
                       name=f"layer_{j}")(x, bias, enc, enc_bias)
    return x


class _UnevenStack(nn.Module):
  """Unrolled groups when num_hidden_layers % freq != 0 (last group shorter); same names as
  LayerStack's unrolled layout."""
  config: QFormerConfig
  query_length: int
  deterministic: bool

  @nn.compact
  def __call__(self, x, *args):
    cfg = self.config
    f, n = cfg.cross_attention_frequency, cfg.num_hidden_layers
    cls = QFormerGroup
    if cfg.remat != "none":
      cls = nn.remat(cls, policy=L.remat_policy(cfg.remat), prevent_cse=True)
    for g, start in enumerate(range(0, n, f)):
      x = cls(cfg, min(f, n - start), self.query_length, self.deterministic,
              name=f"layers_{g}")(x, *args)
    return x


def _encoder(cfg: QFormerConfig, query_length: int, deterministic: bool):
  f, n = cfg.cross_attention_frequency, cfg.num_hidden_layers
  if n % f:
    return _UnevenStack(cfg, query_length, deterministic, name="encoder")
  kw = dict(config=cfg, num_layers=f, query_length=query_length, deterministic=deterministic)
  return L.LayerStack(QFormerGroup, kw, n // f, scan=cfg.scan, remat=cfg.remat, name="encoder")


def _word_pos(cfg, ids, position_ids):
  """word + position embeddings (submodules `word_embeddings`, `position_embeddings` of the
  calling module); text positions start at 0 whatever the number of queries."""
  word = L.embed(cfg, cfg.vocab_size, cfg.hidden_size, "word_embeddings")
  pos = L.embed(cfg, cfg.max_position_embeddings, cfg.hidden_size, "position_embeddings",
                axes=("pos", "embed"))
  if position_ids is None:
    position_ids = jnp.arange(ids.shape[1])[None]
  return word(ids) + pos(jnp.broadcast_to(position_ids, ids.shape))


class QFormerTextEmbeddings(nn.Module):
  """word + position embeddings of the text, no norm (HF `Blip2TextEmbeddings`, blip2 layout)."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, input_ids, position_ids=None):
    return _word_pos(self.config, input_ids, position_ids)


class QFormerEmbeddings(nn.Module):
  """InstructBLIP embeddings: [queries; word + position of text] -> layernorm -> dropout."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, query_embeds=None, input_ids=None, position_ids=None, deterministic=True):
    cfg = self.config
    parts = [] if query_embeds is None else [query_embeds.astype(cfg.jdtype)]
    if input_ids is not None:
      parts.append(_word_pos(cfg, input_ids, position_ids))
    elif self.is_initializing():
      _word_pos(cfg, jnp.zeros((1, 1), jnp.int32), None)
    if not parts:
      raise ValueError("give query_embeds and/or input_ids")
    h = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    h = _norm(cfg, "layernorm")(h)
    return nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)


def _as_bias(mask, q_len, k_len, what):
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if (mask.ndim == 2 and mask.shape[1] == k_len
      or mask.ndim == 3 and mask.shape[1:] == (q_len, k_len)):
    return L.mask_to_bias(mask)
  raise ValueError(f"{what} must be (B, {k_len}) or (B, {q_len}, {k_len}), got {mask.shape}")


class QFormerModel(nn.Module):
  """HF Blip2QFormerModel / InstructBlipQFormerModel. Returns dict(last_hidden_state,
  pooler_output = first position). `query_embeds=None` gives a text-only pass (ITC)."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, query_embeds=None, input_ids=None, attention_mask=None,
               encoder_hidden_states=None, encoder_attention_mask=None, deterministic=True,
               text_embeds=None, position_ids=None):
    cfg = self.config
    dt = cfg.jdtype
    ql = 0 if query_embeds is None else query_embeds.shape[1]
    if cfg.layout == "instructblip":
      if text_embeds is not None:
        raise ValueError("the instructblip layout embeds the text itself: pass input_ids")
      h = QFormerEmbeddings(cfg, name="embeddings")(query_embeds, input_ids, position_ids,
                                                    deterministic)
    else:
      if input_ids is not None:
        raise ValueError("blip2 layout: the text embeddings live outside the Q-Former (HF "
                         "`embeddings.*`); pass text_embeds=QFormerTextEmbeddings(...)(input_ids) "
                         "or use QFormerWithEmbeddings")
      parts = [p.astype(dt) for p in (query_embeds, text_embeds) if p is not None]
      if not parts:
        raise ValueError("give query_embeds and/or text_embeds")
      h = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
      h = _norm(cfg, "layernorm")(h)
      h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
    h = L.constrain(h, ACT)
    b, s = h.shape[:2]
    bias = _as_bias(attention_mask, s, s, "attention_mask")
    enc = enc_bias = None
    if encoder_hidden_states is not None:
      enc = encoder_hidden_states.astype(dt)
      enc_bias = _as_bias(encoder_attention_mask, ql, enc.shape[1], "encoder_attention_mask")
    elif self.is_initializing():
      enc = jnp.zeros((b, 1, cfg.encoder_hidden_size), dt)
    h = _encoder(cfg, ql, deterministic)(h, bias, enc, enc_bias)
    return {"last_hidden_state": h, "pooler_output": h[:, 0]}


class QFormerWithEmbeddings(nn.Module):
  """`embeddings` + `qformer` as in HF Blip2ForImageTextRetrieval / Blip2TextModelWithProjection
  (blip2 layout); for the instructblip layout only `qformer`. Table: `with_embeddings_hf_rules`."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, query_embeds=None, input_ids=None, attention_mask=None,
               encoder_hidden_states=None, encoder_attention_mask=None, deterministic=True,
               position_ids=None):
    cfg = self.config
    qformer = QFormerModel(cfg, name="qformer")
    if cfg.layout == "instructblip":
      return qformer(query_embeds, input_ids, attention_mask, encoder_hidden_states,
                     encoder_attention_mask, deterministic, position_ids=position_ids)
    emb = QFormerTextEmbeddings(cfg, name="embeddings")
    text = None
    if input_ids is not None:
      text = emb(input_ids, position_ids)
    elif self.is_initializing():
      emb(jnp.zeros((1, 1), jnp.int32))
    return qformer(query_embeds, None, attention_mask, encoder_hidden_states,
                   encoder_attention_mask, deterministic, text_embeds=text)


class _LMTransform(nn.Module):
  config: QFormerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = L.dense(cfg, cfg.hidden_size, ("mlp", "embed"), "dense")(x)
    return _norm(cfg, "LayerNorm")(L.activation(cfg.hidden_act)(x))


class QFormerLMHead(nn.Module):
  """BERT `cls.predictions` (ITG head): dense + act + LayerNorm, then logits over the vocab.
  Tied (BERT / LAVIS default): pass the (vocab, hidden) word-embedding table to __call__."""
  config: QFormerConfig
  tie_word_embeddings: bool = True

  @nn.compact
  def __call__(self, hidden_states, word_embeddings=None):
    cfg = self.config
    dt = cfg.jdtype
    h = _LMTransform(cfg, name="transform")(hidden_states)
    if self.tie_word_embeddings:
      if word_embeddings is None:
        if not self.is_initializing():
          raise ValueError("tied LM head: pass the word-embedding table")
        word_embeddings = jnp.zeros((cfg.vocab_size, cfg.hidden_size), dt)
      logits = jnp.dot(h.astype(dt), jnp.asarray(word_embeddings).astype(dt).T)
    else:
      logits = L.dense(cfg, cfg.vocab_size, ("embed", "vocab"), "decoder", use_bias=False)(h)
    bias = L.param_with_axes(self, "bias", nn.initializers.zeros, (cfg.vocab_size,),
                             cfg.jparam_dtype, ("vocab",))
    logits = logits + bias.astype(dt)
    return L.constrain(logits, (L.BATCH, L.LENGTH, "activation_vocab"))


# ----------------------------------------------------------------------------------------
# name tables


def hf_ignore(config: QFormerConfig) -> list[str]:
  """HF keys that may be present without a rule: the non-persistent position_ids buffer of old
  checkpoints."""
  return [r"(.*\.)?position_ids"]


def lm_head_hf_ignore(tie_word_embeddings: bool = True) -> list[str]:
  """The same for `lm_head_hf_rules`: cls.predictions.decoder.bias (tied to cls.predictions.bias),
  and for a tied head its decoder.weight (a copy of the word embeddings)."""
  out = [r"(.*\.)?cls\.predictions\.decoder\.bias"]
  return out + ([r"(.*\.)?cls\.predictions\.decoder\.weight"] if tie_word_embeddings else [])


def attention_rules(flax, hf, out, inner: str = "attention"):
  """Appends the rules of a `QFormerAttention` at `flax` <-> a BERT attention block at `hf`, whose
  query / key / value live under `hf.{inner}` (Q-Former: `attention`, BLIP's text model: `self`)."""
  for p in ("query", "key", "value"):
    out += [Rule(f"{flax}/attention/{p}/kernel", f"{hf}.{inner}.{p}.weight", "linear"),
            Rule(f"{flax}/attention/{p}/bias", f"{hf}.{inner}.{p}.bias")]
  output_rules(flax + "/output", hf + ".output", out)


def output_rules(flax, hf, out):
  """Appends the rules of a `QFormerSelfOutput` (dense + LayerNorm)."""
  out += [Rule(f"{flax}/dense/kernel", f"{hf}.dense.weight", "linear"),
          Rule(f"{flax}/dense/bias", f"{hf}.dense.bias"),
          Rule(f"{flax}/LayerNorm/scale", f"{hf}.LayerNorm.weight"),
          Rule(f"{flax}/LayerNorm/bias", f"{hf}.LayerNorm.bias")]


def embeddings_hf_rules(config: QFormerConfig, prefix: str = "") -> list[Rule]:
  """QFormerTextEmbeddings <-> HF Blip2TextEmbeddings (keys relative to it)."""
  return [Rule("word_embeddings/embedding", f"{prefix}word_embeddings.weight"),
          Rule("position_embeddings/embedding", f"{prefix}position_embeddings.weight")]


def hf_rules(config: QFormerConfig, layout: str | None = None) -> list[Rule]:
  """QFormerModel <-> HF Blip2QFormerModel / InstructBlipQFormerModel (keys relative to it)."""
  layout = layout or config.layout
  if layout != config.layout:
    raise ValueError(f"layout {layout!r} differs from config.layout {config.layout!r}")
  out: list[Rule] = []
  if layout == "instructblip":
    out += prefixed(embeddings_hf_rules(config), "embeddings/", "embeddings.")
    out += [Rule("embeddings/layernorm/scale", "embeddings.layernorm.weight"),
            Rule("embeddings/layernorm/bias", "embeddings.layernorm.bias")]
  else:
    out += [Rule("layernorm/scale", "layernorm.weight"), Rule("layernorm/bias", "layernorm.bias")]
  f = config.cross_attention_frequency
  for i in range(config.num_hidden_layers):
    fl, hf = f"encoder/layers_{i // f}/layer_{i % f}", f"encoder.layer.{i}"
    attention_rules(f"{fl}/attention", f"{hf}.attention", out)
    if i % f == 0:
      attention_rules(f"{fl}/crossattention", f"{hf}.crossattention", out)
    for sfx in (("", "_query") if config.has_text_ffn else ("_query",)):
      fi, hi = f"{fl}/intermediate{sfx}/dense", f"{hf}.intermediate{sfx}.dense"
      out += [Rule(f"{fi}/kernel", f"{hi}.weight", "linear"), Rule(f"{fi}/bias", f"{hi}.bias")]
      output_rules(f"{fl}/output{sfx}", f"{hf}.output{sfx}", out)
  return out


def with_embeddings_hf_rules(config: QFormerConfig) -> list[Rule]:
  """QFormerWithEmbeddings <-> HF composite keys `embeddings.*` + `qformer.*`."""
  out = prefixed(hf_rules(config), "qformer/", "qformer.")
  if config.layout == "blip2":
    out += prefixed(embeddings_hf_rules(config), "embeddings/", "embeddings.")
  return out


def lm_head_hf_rules(config: QFormerConfig, tie_word_embeddings: bool = True,
                     prefix: str = "cls.predictions.") -> list[Rule]:
  """QFormerLMHead <-> BERT `cls.predictions.*` (LAVIS: prefix 'Qformer.cls.predictions.')."""
  out = [Rule("transform/dense/kernel", f"{prefix}transform.dense.weight", "linear"),
         Rule("transform/dense/bias", f"{prefix}transform.dense.bias"),
         Rule("transform/LayerNorm/scale", f"{prefix}transform.LayerNorm.weight"),
         Rule("transform/LayerNorm/bias", f"{prefix}transform.LayerNorm.bias"),
         Rule("bias", f"{prefix}bias")]
  if not tie_word_embeddings:
    out.append(Rule("decoder/kernel", f"{prefix}decoder.weight", "linear"))
  return out


# ----------------------------------------------------------------------------------------
# initialisation from BERT


def init_args(cfg):
  """(args, kwargs) for `io.abstract_params(QFormerModel(cfg), *args, **kwargs)` (creates every
  param; QFormerWithEmbeddings takes the same)."""
  dt = cfg.jdtype
  return (jnp.zeros((1, 1, cfg.hidden_size), dt),), dict(
      encoder_hidden_states=jnp.zeros((1, 1, cfg.encoder_hidden_size), dt))
