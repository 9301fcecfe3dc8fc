"""BLIP (Li et al. 2022, the first model of the BLIP series) in Flax: the CapFilt captioner and filter.

Twins of transformers' `BlipForConditionalGeneration` (captioner: ViT + image-grounded text decoder)
and `BlipForImageTextRetrieval` (filter: ViT + image-grounded text encoder, ITM head, ITC
projections), built from the package's own pieces:
  * the vision tower is `vit.VisionModel`: HF's BlipVisionModel is the layout Blip2VisionModel copied
    (patch conv with bias, CLS + learned positions bicubic-interpolated for other sizes, pre-LN
    blocks with one fused qkv Linear whose bias holds q, k and v, `post_layernorm` on every token and
    once more on the CLS row for the pooler). BLIP's config has no `qkv_bias` (always a bias) and its
    eps defaults to 1e-5, which `post_layernorm` shares.
  * the text model is BERT with cross-attention to the image in every layer when `is_decoder`
    (HF builds `crossattention` only then), word + absolute position embeddings and a LayerNorm,
    no token types, no pooler in these two classes. Its attention / output / intermediate blocks,
    embeddings and `cls.predictions` head are the Q-Former's (`models/qformer.py`), which are BERT's.
    HF names the query / key / value holder `attention.self` (the Q-Former: `attention.attention`).
  * masks: the decoder is causal plus key padding; the encoder is bidirectional with key padding;
    the cross-attention sees every image token (HF passes no image mask or one of ones).
  * LM head: dense + act + LayerNorm, logits against the word-embedding table plus a bias, tied
    when the top-level or the text `tie_word_embeddings` is set (transformers 5 ties when either is;
    untied, HF's logits use `cls.predictions.decoder.bias` and `cls.predictions.bias` is unused).
  * LM loss (HF `labels`): next-token cross-entropy of logits[:, :-1] against labels[:, 1:], mean
    over labels != -100, with the text config's `label_smoothing` (the top-level one is unused).
  * ITM: itm_head on the [CLS] output of the text encoder cross-attending to the image (logits
    (B, 2); index 1 = match). ITC: cosine of normalised vision_proj(image CLS) and text_proj(text
    [CLS]) of a text-only pass.

Decoding (`decoding/blip.py`) runs the decoder with caches: self-attention keys / values per caption
row, the image's cross-attention keys / values projected once per image and shared by its G rows
(`qformer.QFormerMultiHeadAttention`), as the ITM pass shares one image among the texts it scores.
`pixel_values` are NHWC.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import flax.linen as nn
import jax.numpy as jnp

from blip2_jax.core.naming import Rule, prefixed
from blip2_jax.models import blip2, qformer, registry, vit
from blip2_jax.models import layers as L

ACT = (L.BATCH, L.LENGTH, L.EMBED)
ARCHITECTURES = ("BlipForConditionalGeneration", "BlipForImageTextRetrieval")
_TEXT_FIELDS = ("vocab_size", "hidden_size", "encoder_hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "bos_token_id",
                "eos_token_id", "pad_token_id", "sep_token_id", "is_decoder", "label_smoothing")
_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "initializer_range")


_UNSET = object()


def _getter(cfg):
  return cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))


@dataclasses.dataclass(frozen=True)
class BlipTextConfig(L.Runtime):
  """Every BlipTextConfig field that changes the computation (HF defaults). `is_decoder`: the layers
  hold cross-attention; `bos_token_id` is [DEC], `sep_token_id` [SEP] (the captioner's EOS)."""
  vocab_size: int = 30524
  hidden_size: int = 768
  encoder_hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 512
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.0
  attention_probs_dropout_prob: float = 0.0
  initializer_range: float = 0.02
  bos_token_id: int | None = 30522
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = 0
  sep_token_id: int | None = 102
  is_decoder: bool = True
  label_smoothing: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                       f"{self.num_attention_heads}")
    L.activation(self.hidden_act)  # ValueError naming an unknown activation

  @classmethod
  def from_hf(cls, hf_config, **runtime) -> "BlipTextConfig":
    """From a transformers BlipTextConfig (or its dict); runtime fields as keywords."""
    get = _getter(hf_config)
    act = get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in L.ACTIVATIONS:
      raise ValueError(f"text hidden_act={act!r} is not supported; known: {sorted(L.ACTIVATIONS)}")
    kw = {f: get(f) for f in _TEXT_FIELDS if get(f, _UNSET) is not _UNSET}  # token ids may be None
    for f in ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range",
              "label_smoothing"):
      if f in kw:
        kw[f] = float(kw[f])
    if isinstance(kw.get("eos_token_id"), list):
      kw["eos_token_id"] = tuple(kw["eos_token_id"])
    return cls(**kw, **runtime)

  def hf_dict(self) -> dict:
    d = {f: getattr(self, f) for f in _TEXT_FIELDS}
    if isinstance(d["eos_token_id"], tuple):
      d["eos_token_id"] = list(d["eos_token_id"])
    return d


@dataclasses.dataclass(frozen=True)
class BlipConfig:
  """A BLIP composite: `vision` (the ViT), `text` (the BERT decoder or encoder), the ITC width
  `image_text_hidden_size`, whether the LM head is tied to the word embeddings, and the HF class."""
  vision: vit.VisionConfig
  text: BlipTextConfig
  image_text_hidden_size: int = 256
  tie_word_embeddings: bool = True
  architecture: str = "BlipForConditionalGeneration"
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"architecture {self.architecture!r} is not supported; BLIP: {ARCHITECTURES}")
    v = self.vision
    if not v.qkv_bias or v.post_layernorm_eps is not None:
      raise ValueError("BLIP's vision tower always has a qkv bias and one layer_norm_eps "
                       "(qkv_bias=False / post_layernorm_eps are BLIP-2 / LAVIS options)")
    if self.text.encoder_hidden_size != v.hidden_size:
      raise ValueError(f"text encoder_hidden_size {self.text.encoder_hidden_size} differs from the vision "
                       f"hidden_size {v.hidden_size} (HF's BlipConfig sets one from the other)")

  @classmethod
  def from_hf(cls, hf_config, *, architecture: str | None = None, **runtime) -> "BlipConfig":
    """From a transformers BlipConfig (runtime fields: dtype, param_dtype, scan, remat, attn_impl)."""
    L.check_runtime(runtime)
    if getattr(hf_config, "model_type", None) != "blip":
      raise ValueError(f"model_type {getattr(hf_config, 'model_type', None)!r} is not a BLIP config")
    arch = architecture or (getattr(hf_config, "architectures", None) or ["BlipForConditionalGeneration"])[0]
    text, vision = hf_config.text_config, hf_config.vision_config
    tie = bool(getattr(hf_config, "tie_word_embeddings", True)) or bool(getattr(text, "tie_word_embeddings", True))
    return cls(vision=vit.VisionConfig.from_hf(vision, **runtime), text=BlipTextConfig.from_hf(text, **runtime),
               image_text_hidden_size=int(getattr(hf_config, "image_text_hidden_size", 256)),
               tie_word_embeddings=tie, architecture=arch,
               initializer_range=float(getattr(hf_config, "initializer_range", 0.02)))

  def to_hf(self):
    import transformers
    vision = {f: getattr(self.vision, f) for f in _VISION_FIELDS}
    text = dict(self.text.hf_dict(), tie_word_embeddings=self.tie_word_embeddings)
    cfg = transformers.BlipConfig(text_config=text, vision_config=vision,
                                  image_text_hidden_size=self.image_text_hidden_size,
                                  tie_word_embeddings=self.tie_word_embeddings,
                                  initializer_range=self.initializer_range)
    cfg.architectures = [self.architecture]
    return cfg

  def replace_runtime(self, **runtime) -> "BlipConfig":
    return dataclasses.replace(self, vision=self.vision.replace_runtime(**runtime),
                               text=self.text.replace_runtime(**runtime))


# ----------------------------------------------------------------------------------------
# text model


class BlipTextLayer(nn.Module):
  """BlipTextLayer: self-attention, cross-attention to the image (when the layer has it and an
  image or its cached keys / values are given), FFN. With a per-layer `cache` ({"k", "v"}, plus
  {"ck", "cv"}: the image's keys / values) returns (x, new cache): the first cached call, with
  `enc`, adds the image keys / values to it; later calls (enc None) read them and return
  {"k", "v"} only."""
  config: BlipTextConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, bias, enc, enc_bias, cache_index=None, cache=None):
    cfg, det = self.config, self.deterministic
    new = {}
    att = qformer.QFormerAttention(cfg, name="attention")
    if cache is None:
      h = att(x, bias, None, det)
    else:
      h, new = att(x, bias, None, det, {"k": cache["k"], "v": cache["v"]}, cache_index)
    if enc is not None or (cache is not None and "ck" in cache):
      if not cfg.is_decoder:
        raise ValueError("this text model has no cross-attention (text config is_decoder=False)")
      cross = qformer.QFormerAttention(cfg, cross=True, name="crossattention")
      if cache is None:
        h = cross(h, enc_bias, enc, det)
      elif enc is not None:  # first cached call: the image keys / values join the cache
        h, c = cross(h, enc_bias, enc, det, {})
        new = dict(new, ck=c["k"], cv=c["v"])
      else:  # not returned again: a scan would copy them every step
        h, _ = cross(h, enc_bias, None, det, {"k": cache["ck"], "v": cache["cv"]})
    elif cfg.is_decoder and self.is_initializing():  # create the cross-attention of a text-only init
      qformer.QFormerAttention(cfg, cross=True, name="crossattention")(
          x[:1, :1], None, jnp.zeros((1, 1, cfg.encoder_hidden_size), x.dtype), det)
    inter = qformer.QFormerIntermediate(cfg, name="intermediate")(h)
    out = qformer.QFormerSelfOutput(cfg, ("mlp", "embed"), name="output")(inter, h, det)
    out = L.constrain(out, ACT)
    return out if cache is None else (out, new)


class BlipTextModel(nn.Module):
  """HF BlipTextModel without pooler: -> {"last_hidden_state"[, "cache"]}.

  `causal`: the decoder's mask (HF is_decoder=True), else bidirectional. `attention_mask` (B, T)
  keeps 1s; with `cache` (init_cache, S slots) the T inputs sit at slots cache_index.. and the mask
  is (B, S) over slots (None: every slot up to the current one). `encoder_hidden_states` (B_img, S,
  D_img) may have fewer rows than the text (rows(text) / rows(image) consecutive texts per image)."""
  config: BlipTextConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
               *, causal: bool = False, position_ids=None, deterministic: bool = True, cache=None,
               cache_index=None):
    cfg = self.config
    t = input_ids.shape[1]
    if position_ids is None:  # HF: positions continue after the cached ones
      position_ids = jnp.arange(t)[None] + (0 if cache is None else cache_index)
    h = qformer.QFormerEmbeddings(cfg, name="embeddings")(None, input_ids, position_ids, deterministic)
    h = L.constrain(h, ACT)
    if cache is not None:
      bias = L.cached_causal_bias(attention_mask, t, cache["k"].shape[3], cache_index)
    elif causal:
      bias = L.causal_padding_bias(attention_mask, t)
    else:
      bias = None if attention_mask is None else L.mask_to_bias(attention_mask)[:, None, None, :]
    enc = enc_bias = None
    if encoder_hidden_states is not None:
      enc = encoder_hidden_states.astype(cfg.jdtype)
      if encoder_attention_mask is not None:
        enc_bias = L.mask_to_bias(encoder_attention_mask)[:, None, None, :]
    stack = L.LayerStack(BlipTextLayer, {"config": cfg, "deterministic": deterministic}, cfg.num_hidden_layers,
                         scan=cfg.scan, remat=cfg.remat, name="encoder")
    if cache is None:
      return {"last_hidden_state": stack(h, bias, enc, enc_bias)}
    h, new = stack(h, bias, enc, enc_bias, cache_index, xs=cache)
    return {"last_hidden_state": h, "cache": new}


def init_cache(config: BlipTextConfig, rows: int, max_length: int, dtype=None) -> dict:
  """Empty self-attention cache {"k", "v"}: (layers, rows, heads, max_length, head_dim); the image
  keys / values ("ck", "cv") come from the first cached call."""
  n = config.num_attention_heads
  shape = (config.num_hidden_layers, rows, n, max_length, config.hidden_size // n)
  dt = L.dtype_of(dtype or config.dtype)
  return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


def lm_loss(logits, labels, label_smoothing: float = 0.0):
  """HF BlipTextLMHeadModel's loss: logits[:, :-1] against labels[:, 1:], -100 ignored, mean."""
  return L.cross_entropy(logits[:, :-1], labels[:, 1:], label_smoothing=label_smoothing)


class BlipTextLMHeadModel(nn.Module):
  """HF BlipTextLMHeadModel: `bert` (causal, cross-attending) + `cls` (BERT `cls.predictions`).
  -> {"logits" (B, T, V), "last_hidden_state"[, "loss"][, "cache"]}."""
  config: BlipTextConfig
  tie_word_embeddings: bool = True

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
               *, labels=None, position_ids=None, deterministic: bool = True, cache=None, cache_index=None):
    cfg = self.config
    bert = BlipTextModel(cfg, name="bert")
    out = bert(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, causal=True,
               position_ids=position_ids, deterministic=deterministic, cache=cache, cache_index=cache_index)
    table = None
    if self.tie_word_embeddings:  # (boxed with its logical axes while initialising)
      table = nn.unbox(bert.variables["params"]["embeddings"]["word_embeddings"]["embedding"])
    logits = qformer.QFormerLMHead(cfg, self.tie_word_embeddings, name="cls")(out["last_hidden_state"], table)
    out = dict(out, logits=logits)
    if labels is not None:
      out["loss"] = lm_loss(logits, labels, cfg.label_smoothing)
    return out


# ----------------------------------------------------------------------------------------
# composites


@registry.composite
class BlipForConditionalGeneration(nn.Module):
  """HF BlipForConditionalGeneration (the CapFilt captioner): `vision_model` + `text_decoder`.

  `__call__(pixel_values, input_ids, ...)` -> {"logits", "image_embeds", "vision_outputs"[, "loss"]}
  as HF's forward (the caller puts [DEC] first, as HF's generate does); `image_embeds` and `decode`
  split it for decoding."""
  config: BlipConfig

  def setup(self):
    cfg = self.config
    self.vision_model = vit.VisionModel(cfg.vision)
    self.text_decoder = BlipTextLMHeadModel(cfg.text, cfg.tie_word_embeddings)

  def image_embeds(self, pixel_values, interpolate_pos_encoding=False, deterministic=True):
    """The ViT's outputs (dict: last_hidden_state (B, S, D), pooler_output)."""
    return self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                             deterministic=deterministic)

  def decode(self, input_ids, image_embeds=None, attention_mask=None, *, labels=None, position_ids=None,
             deterministic=True, cache=None, cache_index=None):
    """The text decoder over `input_ids` cross-attending to `image_embeds` (rows may be shared, see
    BlipTextModel; None with a cache holding the image keys / values)."""
    return self.text_decoder(input_ids, attention_mask, image_embeds, labels=labels, position_ids=position_ids,
                             deterministic=deterministic, cache=cache, cache_index=cache_index)

  def __call__(self, pixel_values, input_ids, attention_mask=None, labels=None, interpolate_pos_encoding=False,
               deterministic=True):
    vis = self.image_embeds(pixel_values, interpolate_pos_encoding, deterministic)
    out = self.decode(input_ids, vis["last_hidden_state"], attention_mask, labels=labels,
                      deterministic=deterministic)
    return dict(out, image_embeds=vis["last_hidden_state"], vision_outputs=vis)


@registry.composite
class BlipForImageTextRetrieval(nn.Module):
  """HF BlipForImageTextRetrieval (the CapFilt filter): `vision_model`, `text_encoder` (no pooler),
  `vision_proj`, `text_proj`, `itm_head`.

  `__call__(..., use_itm_head=True)` -> itm_score (B, 2) logits; False: (B_img, B_txt) cosines, as HF."""
  config: BlipConfig

  def setup(self):
    cfg = self.config
    std = cfg.initializer_range
    self.vision_model = vit.VisionModel(cfg.vision)
    self.text_encoder = BlipTextModel(cfg.text)
    self.vision_proj = L.dense(cfg.vision, cfg.image_text_hidden_size, ("embed", None), init_std=std)
    self.text_proj = L.dense(cfg.text, cfg.image_text_hidden_size, ("embed", None), init_std=std)
    self.itm_head = L.dense(cfg.text, 2, ("embed", None), init_std=std)

  def image_feature(self, image_embeds):
    """Normalised vision_proj of the image [CLS] (B, E), float32."""
    return blip2._normalize(self.vision_proj(image_embeds[:, 0]))

  def image_features(self, pixel_values, interpolate_pos_encoding=False, deterministic=True):
    """(vision_outputs, None, image feature (B, 1, E)): the layout of BLIP-2's `image_features` with
    one query and no Q-Former, so `inference.retrieval_scores` ranks with BLIP as LAVIS does."""
    vis = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                            deterministic=deterministic)
    return vis, None, self.image_feature(vis["last_hidden_state"])[:, None]

  def text_features(self, input_ids, attention_mask=None, deterministic=True):
    """(text-only encoder outputs, normalised text_proj of the [CLS] (B, E) float32): ITC."""
    out = self.text_encoder(input_ids, attention_mask, deterministic=deterministic)
    return out, blip2._normalize(self.text_proj(out["last_hidden_state"][:, 0]))

  def itm_logits(self, image_embeds, input_ids, attention_mask=None, deterministic=True):
    """(ITM logits (B_txt, 2) float32, encoder outputs): the text encoder cross-attends to
    `image_embeds` (B_img, S, D); B_txt / B_img consecutive texts share an image."""
    out = self.text_encoder(input_ids, attention_mask, image_embeds, deterministic=deterministic)
    return self.itm_head(out["last_hidden_state"][:, 0]).astype(jnp.float32), out

  def __call__(self, pixel_values, input_ids, attention_mask=None, use_itm_head=True,
               interpolate_pos_encoding=False, deterministic=True):
    vis = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                            deterministic=deterministic)
    image_embeds = vis["last_hidden_state"]
    if self.is_initializing():  # every parameter; no cross-attention without is_decoder
      out, text_feat = self.text_features(input_ids, attention_mask, deterministic)
      score = self.itm_head(out["last_hidden_state"][:, 0])
      if self.config.text.is_decoder:
        score, out = self.itm_logits(image_embeds, input_ids, attention_mask, deterministic)
      self.image_feature(image_embeds)
    elif use_itm_head:
      score, out = self.itm_logits(image_embeds, input_ids, attention_mask, deterministic)
    else:
      out, text_feat = self.text_features(input_ids, attention_mask, deterministic)
      score = self.image_feature(image_embeds) @ text_feat.T
    return {"itm_score": score, "last_hidden_state": image_embeds, "question_embeds": out["last_hidden_state"],
            "vision_outputs": vis}


def build(config: BlipConfig) -> nn.Module:
  return registry.composite_class(config.architecture)(config)


def dummy_inputs(config: BlipConfig, batch: int = 1, text_len: int = 2) -> dict:
  """Keyword arguments that make `build(config).init` create every parameter."""
  s = config.vision.image_size
  return dict(pixel_values=jnp.zeros((batch, s, s, config.vision.num_channels), jnp.float32),
              input_ids=jnp.ones((batch, text_len), jnp.int32))


# ----------------------------------------------------------------------------------------
# HF <-> Flax names


def text_hf_rules(config: BlipTextConfig) -> list[Rule]:
  """BlipTextModel <-> HF BlipTextModel (keys relative to it)."""
  out = prefixed(qformer.embeddings_hf_rules(config), "embeddings/", "embeddings.")
  out += [Rule("embeddings/layernorm/scale", "embeddings.LayerNorm.weight"),
          Rule("embeddings/layernorm/bias", "embeddings.LayerNorm.bias")]
  for i in range(config.num_hidden_layers):
    fl, hf = f"encoder/layers_{i}", f"encoder.layer.{i}"
    qformer.attention_rules(f"{fl}/attention", f"{hf}.attention", out, inner="self")
    if config.is_decoder:
      qformer.attention_rules(f"{fl}/crossattention", f"{hf}.crossattention", out, inner="self")
    out += blip2._linear(f"{fl}/intermediate/dense", f"{hf}.intermediate.dense")
    qformer.output_rules(f"{fl}/output", f"{hf}.output", out)
  return out


_HEAD = "text_decoder.cls.predictions."


def hf_rules(config: BlipConfig) -> list[Rule]:
  """The composite's HF <-> Flax name table."""
  rules = prefixed(vit.hf_rules(config.vision), "vision_model/", "vision_model.")
  if config.architecture == "BlipForConditionalGeneration":
    rules += prefixed(text_hf_rules(config.text), "text_decoder/bert/", "text_decoder.bert.")
    head = prefixed(qformer.lm_head_hf_rules(config.text, config.tie_word_embeddings, _HEAD),
                    "text_decoder/cls/", "")
    if not config.tie_word_embeddings:  # untied, HF's logits add decoder.bias (see the module docstring)
      head = [dataclasses.replace(r, hf=_HEAD + "decoder.bias") if r.hf == _HEAD + "bias" else r for r in head]
    return rules + head
  rules += prefixed(text_hf_rules(config.text), "text_encoder/", "text_encoder.")
  for name in ("vision_proj", "text_proj", "itm_head"):
    rules += blip2._linear(name)
  return rules


def hf_ignore(config: BlipConfig) -> list[str]:
  """Regexes of HF keys that may be present without a rule: position_ids buffers of old checkpoints,
  the tied copies of the LM head (tied) or its unused `cls.predictions.bias` (untied)."""
  out = qformer.hf_ignore(config.text)
  if config.architecture == "BlipForConditionalGeneration":
    if config.tie_word_embeddings:
      out += [r"text_decoder\." + p for p in qformer.lm_head_hf_ignore(True)]
    else:
      out.append(r"text_decoder\.cls\.predictions\.bias")
  return out
