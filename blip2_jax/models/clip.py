"""OpenAI CLIP: the Flax twin of HF `CLIPModel` (vision and text towers, projections, logit scale),
the image-text ranker of BLIP-2's CapFilt (a CLIP ViT-L/14 scored the web text and the synthetic
captions of every image; the top two were kept).

What HF's CLIP computes (transformers 5 `models/clip/modeling_clip.py`), which this file follows:
- One encoder layer for both towers, pre-LN: x + out_proj(attn(q_proj, k_proj, v_proj of
  layer_norm1(x))), then x + fc2(act(fc1(layer_norm2(x)))); four separate projections, all with bias,
  scale head_dim ** -0.5; `hidden_act` quick_gelu (x * sigmoid(1.702 x), the OpenAI checkpoints) or
  gelu (exact). That is `vit.EncoderLayer` / `vit.MLP` with this file's `Attention`.
- Vision: a patch conv WITHOUT bias, a class embedding of shape (D,), position embeddings as an
  nn.Embedding of (grid ** 2 + 1, D) rows, then `pre_layrnorm` (HF's spelling) before the encoder.
  The last hidden state gets no final norm; pooler_output = post_layernorm(last_hidden_state[:, 0]).
  An image of another size raises unless interpolate_pos_encoding, which resizes the patch grid of
  positions with torch's bicubic (`vit.interpolate_positions`); the native size is left as it is.
- Text: token + position embeddings (a sequence longer than max_position_embeddings raises), a causal
  mask plus the key padding mask, `final_layer_norm` on every token. pooler_output is the final state
  at the EOS position: with the legacy `eos_token_id == 2` of the OpenAI checkpoints' config.json
  (before transformers PR 24773) the argmax of input_ids (the end-of-text token 49407 is the largest
  id, and argmax takes the first of ties), otherwise the first position holding `eos_token_id`
  (position 0 when there is none).
- CLIPModel: `visual_projection` and `text_projection` without bias, to the TOP config's
  projection_dim (the towers' own projection_dim serves the *WithProjection classes only); both
  embeddings divided by their L2 norm (no eps); logits_per_text = exp(logit_scale) * text @ image.T,
  logits_per_image its transpose. logit_scale is stored as a log (ln 100 = 4.6052 in the OpenAI
  checkpoints) and not clamped at inference; we keep it float32 whatever `param_dtype` (bf16 would
  turn exp(4.6052) = 100 into 98.9).
Pixel values are NHWC. Configs: `TextConfig`, `VisionConfig` (one per tower) and `CLIPConfig`.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax.core.naming import Rule, prefixed
from blip2_jax.models import layers as L
from blip2_jax.models import registry, vit

BATCH, LENGTH, EMBED = L.BATCH, L.LENGTH, L.EMBED
ACT = (BATCH, LENGTH, EMBED)
LEGACY_EOS = 2  # an eos_token_id of 2 selects HF's legacy pooling (argmax of the ids)


# ----------------------------------------------------------------------------------------
# configs


def _getter(hf_config):
  if isinstance(hf_config, Mapping):
    return hf_config.get
  return lambda k, d=None: getattr(hf_config, k, d)


@dataclasses.dataclass(frozen=True)
class _TowerConfig(L.Runtime):
  """What the two tower configs share: the fields of equal defaults, checks, `from_hf` / `to_hf`."""
  HF_CLASS: ClassVar[str] = ""
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  initializer_range: float = 0.02  # fresh initialisation only

  def __post_init__(self):
    super().__post_init__()
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                       f"{self.num_attention_heads}")
    L.activation(self.hidden_act)  # ValueError naming an unknown activation

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def hf_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in L.RUNTIME_FIELDS]

  @classmethod
  def from_hf(cls, hf_config, **runtime):
    """From a transformers CLIP{Text,Vision}Config or its dict (missing keys: HF's defaults);
    runtime fields as keywords. ValueError names an option this model cannot compute."""
    get, missing = _getter(hf_config), object()
    kw = {f: get(f, missing) for f in cls.hf_fields()}
    return cls(**cls._checked({k: v for k, v in kw.items() if v is not missing}), **runtime)

  @classmethod
  def _checked(cls, kw: dict) -> dict:
    return kw

  def to_hf(self):
    import transformers
    return getattr(transformers, self.HF_CLASS)(**{f: getattr(self, f) for f in self.hf_fields()})


@dataclasses.dataclass(frozen=True)
class TextConfig(_TowerConfig):
  """Every CLIPTextConfig field CLIPModel's text tower computes with (pad / bos ids only ride along
  for `to_hf`), plus runtime fields. `eos_token_id` picks the pooled position (module docstring)."""
  HF_CLASS: ClassVar[str] = "CLIPTextConfig"
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  pad_token_id: int | None = 1
  bos_token_id: int | None = 49406
  eos_token_id: int = 49407

  @classmethod
  def _checked(cls, kw: dict) -> dict:
    eos = kw.get("eos_token_id", 49407)
    if isinstance(eos, bool) or not isinstance(eos, int):
      raise ValueError(f"eos_token_id={eos!r} is not supported: CLIP pools the text at the position "
                       "of ONE end-of-text id")
    return kw


@dataclasses.dataclass(frozen=True)
class VisionConfig(_TowerConfig):
  """Every CLIPVisionConfig field the vision tower computes with, plus runtime fields."""
  HF_CLASS: ClassVar[str] = "CLIPVisionConfig"
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return self.grid ** 2 + 1

  @classmethod
  def _checked(cls, kw: dict) -> dict:
    return vit.square_sizes(kw)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """HF CLIPConfig: the two towers, the shared projection width and the logit scale's init.
  `architecture` is config.json's (only CLIPModel is built)."""
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592  # ln(1 / 0.07); fresh initialisation only
  initializer_factor: float = 1.0
  architecture: str = "CLIPModel"

  @classmethod
  def from_hf(cls, hf_config, **runtime) -> "CLIPConfig":
    """From a transformers CLIPConfig (or its dict); `runtime` (dtype, param_dtype, scan, remat,
    attn_impl) applies to both towers."""
    L.check_runtime(runtime)
    get = _getter(hf_config)
    arch = (get("architectures") or ["CLIPModel"])[0]
    if arch != "CLIPModel":
      raise ValueError(f"architecture {arch!r} is not supported; blip2_jax builds CLIPModel only")
    kw = {k: get(k) for k in ("projection_dim", "logit_scale_init_value", "initializer_factor")
          if get(k) is not None}
    return cls(text=TextConfig.from_hf(get("text_config") or {}, **runtime),
               vision=VisionConfig.from_hf(get("vision_config") or {}, **runtime), **kw)

  def to_hf(self):
    import transformers
    towers = {f"{k}_config": dict(c.to_hf().to_dict(), projection_dim=self.projection_dim)
              for k, c in (("text", self.text), ("vision", self.vision))}
    cfg = transformers.CLIPConfig(**towers, projection_dim=self.projection_dim,
                                  logit_scale_init_value=self.logit_scale_init_value,
                                  initializer_factor=self.initializer_factor)
    cfg.architectures = [self.architecture]
    return cfg

  def replace_runtime(self, **runtime) -> "CLIPConfig":
    return dataclasses.replace(self, text=self.text.replace_runtime(**runtime),
                               vision=self.vision.replace_runtime(**runtime))


# ----------------------------------------------------------------------------------------
# modules


class Attention(vit.Attention):
  """CLIPAttention: separate q / k / v / out projections, all with bias; `bias` is the text
  tower's additive causal + padding mask (None in the vision tower)."""
  OUT_NAME = "out_proj"

  def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    cfg = self.config
    return tuple(L.split_heads(L.dense(cfg, cfg.hidden_size, ("embed", "heads"), name)(x),
                               cfg.num_attention_heads) for name in ("q_proj", "k_proj", "v_proj"))


def _encoder(cfg: _TowerConfig, deterministic: bool) -> L.LayerStack:
  """CLIPEncoder: `vit.EncoderLayer` with CLIP's attention, scanned or unrolled."""
  return L.LayerStack(vit.EncoderLayer, {"config": cfg, "deterministic": deterministic, "attention": Attention},
                      cfg.num_hidden_layers, scan=cfg.scan, remat=cfg.remat, name="encoder")


class VisionEmbeddings(nn.Module):
  """CLIPVisionEmbeddings: bias-free patch conv (as a matmul) + class embedding + positions."""
  config: VisionConfig

  @nn.compact
  def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
    cfg = self.config
    d, s = cfg.hidden_size, cfg.image_size
    b, h, w, _ = pixel_values.shape
    if not interpolate_pos_encoding and (h, w) != (s, s):
      raise ValueError(f"input image size ({h}*{w}) doesn't match model ({s}*{s}); "
                       "pass interpolate_pos_encoding=True to run at another size")
    init = L.normal_init(cfg.initializer_range)
    class_embedding = L.param_with_axes(self, "class_embedding", init, (d,), cfg.jparam_dtype, ("embed",))
    table = L.param_with_axes(self, "position_embedding", init, (cfg.num_positions, d), cfg.jparam_dtype,
                              ("pos", "embed"))
    x, gh, gw = vit.patchify(pixel_values, cfg)
    patches = vit.PatchEmbedding(cfg, use_bias=False, name="patch_embedding")(x)
    cls = jnp.broadcast_to(class_embedding.astype(cfg.jdtype), (b, 1, d))
    x = jnp.concatenate([cls, patches], axis=1)
    if interpolate_pos_encoding and not (gh * gw == cfg.grid ** 2 and h == w):
      table = vit.interpolate_positions(table, cfg.grid, gh, gw)
    return L.constrain(x + table.astype(cfg.jdtype)[None], ACT)


class VisionModel(nn.Module):
  """CLIPVisionModel. `__call__(pixel_values NHWC) -> {last_hidden_state, pooler_output}`;
  `interpolate_pos_encoding` and `deterministic` are Python bools (static under jit)."""
  config: VisionConfig

  @nn.compact
  def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False,
               deterministic: bool = True) -> dict[str, jax.Array]:
    cfg = self.config
    x = VisionEmbeddings(cfg, name="embeddings")(pixel_values, interpolate_pos_encoding)
    x = L.norm(cfg, "pre_layrnorm", eps=cfg.layer_norm_eps)(x)
    x = L.constrain(_encoder(cfg, deterministic)(x), ACT)
    pooled = L.norm(cfg, "post_layernorm", eps=cfg.layer_norm_eps)(x[:, 0])
    return {"last_hidden_state": x, "pooler_output": pooled}


class TextEmbeddings(nn.Module):
  """CLIPTextEmbeddings: token + position embeddings."""
  config: TextConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, position_ids: jax.Array) -> jax.Array:
    cfg = self.config
    tok = L.embed(cfg, cfg.vocab_size, cfg.hidden_size, "token_embedding")(input_ids)
    pos = L.embed(cfg, cfg.max_position_embeddings, cfg.hidden_size, "position_embedding",
                  axes=("pos", "embed"))(position_ids)
    return L.constrain(tok + pos, ACT)


class TextModel(nn.Module):
  """CLIPTextModel. `__call__(input_ids, attention_mask=None, position_ids=None) ->
  {last_hidden_state, pooler_output}` (pooled at the EOS position, module docstring)."""
  config: TextConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None, deterministic: bool = True) -> dict[str, jax.Array]:
    cfg = self.config
    b, t = input_ids.shape
    if t > cfg.max_position_embeddings:
      raise ValueError(f"{t} text tokens but the model has {cfg.max_position_embeddings} positions; "
                       "tokenize with truncation to max_position_embeddings")
    if position_ids is None:
      position_ids = jnp.arange(t)[None]
    x = TextEmbeddings(cfg, name="embeddings")(input_ids, position_ids)
    x = _encoder(cfg, deterministic)(x, L.causal_padding_bias(attention_mask, t))
    x = L.constrain(L.norm(cfg, "final_layer_norm", eps=cfg.layer_norm_eps)(x), ACT)
    ids = input_ids.astype(jnp.int32)
    eos = jnp.argmax(ids if cfg.eos_token_id == LEGACY_EOS else ids == cfg.eos_token_id, axis=-1)
    return {"last_hidden_state": x, "pooler_output": x[jnp.arange(b), eos]}


def _normalize(x: jax.Array) -> jax.Array:
  """x / ||x|| in float32, as HF CLIP (no eps)."""
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


@registry.composite
class CLIPModel(nn.Module):
  """HF CLIPModel. `__call__` returns HF's CLIPOutput fields: logits_per_image (I, T),
  logits_per_text, image_embeds / text_embeds (projected, L2-normalised), vision_model_output and
  text_model_output (the towers' outputs, pooler_output BEFORE the projection, as CLIPVisionModel /
  CLIPTextModel give it; HF 5's CLIPModel puts the projected one there). `image_features` /
  `text_features` give one side each."""
  config: CLIPConfig

  def setup(self):
    cfg = self.config
    self.text_model = TextModel(cfg.text)
    self.vision_model = VisionModel(cfg.vision)
    self.visual_projection = L.dense(cfg.vision, cfg.projection_dim, ("embed", None), use_bias=False)
    self.text_projection = L.dense(cfg.text, cfg.projection_dim, ("embed", None), use_bias=False)
    self.logit_scale = L.param_with_axes(self, "logit_scale", nn.initializers.constant(cfg.logit_scale_init_value),
                                         (), jnp.float32, ())

  def image_features(self, pixel_values, interpolate_pos_encoding=False, deterministic=True):
    """(vision_model outputs, image_embeds: the projected pooled output L2-normalised, (B, E) float32)."""
    vis = self.vision_model(pixel_values, interpolate_pos_encoding, deterministic)
    return vis, _normalize(self.visual_projection(vis["pooler_output"]))

  def text_features(self, input_ids, attention_mask=None, position_ids=None, deterministic=True):
    """(text_model outputs, text_embeds: the projected pooled output L2-normalised, (B, E) float32)."""
    out = self.text_model(input_ids, attention_mask, position_ids, deterministic)
    return out, _normalize(self.text_projection(out["pooler_output"]))

  def __call__(self, pixel_values, input_ids, attention_mask=None, position_ids=None,
               interpolate_pos_encoding=False, deterministic=True):
    vis, image_embeds = self.image_features(pixel_values, interpolate_pos_encoding, deterministic)
    text, text_embeds = self.text_features(input_ids, attention_mask, position_ids, deterministic)
    logits_per_text = (text_embeds @ image_embeds.T) * jnp.exp(self.logit_scale)
    return dict(logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                image_embeds=image_embeds, text_embeds=text_embeds, vision_model_output=vis,
                text_model_output=text)


def dummy_inputs(config: CLIPConfig, batch: int = 1, text_len: int = 2) -> dict:
  """Keyword arguments that make `CLIPModel(config).init` create every parameter."""
  v = config.vision
  return dict(pixel_values=jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32),
              input_ids=jnp.ones((batch, text_len), jnp.int32))


# ----------------------------------------------------------------------------------------
# HF <-> Flax names (CLIPModel; the towers' tables are relative to CLIP{Vision,Text}Model)


def hf_ignore(config: CLIPConfig) -> list[str]:
  """Older checkpoints (the OpenAI ones among them) still hold the position_ids buffers."""
  return [r"(text|vision)_model\.embeddings\.position_ids"]


def _linear(flax: str, hf: str, n: int = 0, bias: bool = True) -> list[Rule]:
  rules = [Rule(f"{flax}/kernel", f"{hf}.weight", "linear", n)]
  return rules + [Rule(f"{flax}/bias", f"{hf}.bias", "none", n)] if bias else rules


def _norm(flax: str, hf: str, n: int = 0) -> list[Rule]:
  return [Rule(f"{flax}/scale", f"{hf}.weight", "none", n), Rule(f"{flax}/bias", f"{hf}.bias", "none", n)]


def encoder_hf_rules(config: _TowerConfig) -> list[Rule]:
  """CLIPEncoder's layers (both towers)."""
  n, lay, hf = config.num_hidden_layers, "encoder/layers_{i}/", "encoder.layers.{i}."
  rules = []
  for m in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/out_proj", "mlp/fc1", "mlp/fc2"):
    rules += _linear(lay + m, hf + m.replace("/", "."), n)
  return rules + _norm(lay + "layer_norm1", hf + "layer_norm1", n) + _norm(lay + "layer_norm2", hf + "layer_norm2", n)


def vision_hf_rules(config: VisionConfig) -> list[Rule]:
  return [Rule("embeddings/class_embedding", "embeddings.class_embedding"),
          Rule("embeddings/position_embedding", "embeddings.position_embedding.weight"),
          Rule("embeddings/patch_embedding/kernel", "embeddings.patch_embedding.weight", "conv"),
          *_norm("pre_layrnorm", "pre_layrnorm"), *encoder_hf_rules(config),
          *_norm("post_layernorm", "post_layernorm")]


def text_hf_rules(config: TextConfig) -> list[Rule]:
  return [Rule("embeddings/token_embedding/embedding", "embeddings.token_embedding.weight"),
          Rule("embeddings/position_embedding/embedding", "embeddings.position_embedding.weight"),
          *encoder_hf_rules(config), *_norm("final_layer_norm", "final_layer_norm")]


def hf_rules(config: CLIPConfig) -> list[Rule]:
  """CLIPModel's HF <-> Flax name table."""
  return [*prefixed(text_hf_rules(config.text), "text_model/", "text_model."),
          *prefixed(vision_hf_rules(config.vision), "vision_model/", "vision_model."),
          *_linear("visual_projection", "visual_projection", bias=False),
          *_linear("text_projection", "text_projection", bias=False),
          Rule("logit_scale", "logit_scale")]
