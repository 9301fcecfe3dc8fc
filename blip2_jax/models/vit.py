"""BLIP-2 vision encoder (EVA ViT-g layout): the Flax twin of HF `Blip2VisionModel`.

Pixel values are NHWC (B, H, W, C). Layout per block (pre-LN):
  x = x + projection(attn(qkv(layer_norm1(x))));  x = x + fc2(act(fc1(layer_norm2(x))))
then `post_layernorm` on every token; pooler_output = post_layernorm(last_hidden_state[:, 0])
(HF applies the final norm a second time to the CLS row, and so do we). `post_layernorm` is LAVIS's
`ln_vision`; its eps is `VisionConfig.post_layernorm_eps` (see there: HF 1e-6, LAVIS 1e-5).

qkv: one fused (embed, 3 * embed) kernel without bias, plus EVA's q_bias / v_bias (the k bias is
zero). HF stores them as a single `qkv.bias` = [q_bias, k_bias, v_bias] of length 3 * embed, and
so do we (leaf `self_attn/qkv/bias`): a constant key bias adds the same q.b to every logit of a
row, so softmax ignores it, and whatever HF holds in the k part changes nothing. LAVIS
checkpoints hold `q_bias` / `v_bias`; `lavis_qkv_bias` builds the fused vector from them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.core.naming import Rule
from blip2_jax.models import layers as L

BATCH, LENGTH, EMBED = L.BATCH, L.LENGTH, L.EMBED
ACT = (BATCH, LENGTH, EMBED)


# ----------------------------------------------------------------------------------------
# config


@dataclasses.dataclass(frozen=True)
class VisionConfig(L.Runtime):
  """Every Blip2VisionConfig field that changes the computation, plus runtime fields.

  post_layernorm_eps: eps of the final norm only. None (HF checkpoints) means `layer_norm_eps`,
  as HF's Blip2VisionModel computes (1e-6); `checkpoints.lavis.load_lavis` sets 1e-5, the eps of
  LAVIS's `ln_vision` (a default torch LayerNorm). HF's Blip2VisionConfig has no such field:
  `to_hf` writes a value that differs from layer_norm_eps as an extra `post_layernorm_eps` key of
  the vision config, which `from_hf` (so `from_pretrained`) reads back and transformers keeps on
  the config but ignores (its model computes that norm with layer_norm_eps).
  """
  hidden_size: int = 1408
  intermediate_size: int = 6144
  num_hidden_layers: int = 39
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3  # HF hard-codes 3 input channels
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  post_layernorm_eps: float | None = None
  qkv_bias: bool = True
  attention_dropout: float = 0.0
  initializer_range: float = 1e-10  # HF's default; only used for fresh initialisation

  _HF_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "image_size", "patch_size", "hidden_act", "layer_norm_eps", "qkv_bias",
                "attention_dropout", "initializer_range")

  def __post_init__(self):
    super().__post_init__()
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                       f"{self.num_attention_heads}")
    L.activation(self.hidden_act)  # raises ValueError naming an unknown activation

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def post_eps(self) -> float:
    """The eps `post_layernorm` computes with."""
    return self.layer_norm_eps if self.post_layernorm_eps is None else self.post_layernorm_eps

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return self.grid ** 2 + 1

  @classmethod
  def from_hf(cls, hf_config, **runtime) -> "VisionConfig":
    """From a transformers Blip2VisionConfig (or its dict, or a Blip2Config whose
    vision_config is taken); runtime fields as keywords."""
    sub = (hf_config.get("vision_config") if isinstance(hf_config, Mapping)
           else getattr(hf_config, "vision_config", None))
    if sub is not None:
      hf_config = sub
    get = (hf_config.get if isinstance(hf_config, Mapping)
           else lambda k, d=None: getattr(hf_config, k, d))
    kw: dict[str, Any] = {}
    for f in cls._HF_FIELDS:
      v = get(f, None)
      if v is not None:
        kw[f] = v
    square_sizes(kw)
    nc = get("num_channels", 3)
    if nc != 3:
      raise ValueError(f"num_channels={nc}: Blip2VisionModel always builds a 3-channel patch "
                       "embedding, so checkpoints cannot hold another count")
    if kw.get("hidden_act", "gelu") not in L.ACTIVATIONS:
      raise ValueError(f"hidden_act={kw['hidden_act']!r} is not supported; known: "
                       f"{sorted(L.ACTIVATIONS)}")
    kw["qkv_bias"] = bool(kw.get("qkv_bias", True))
    for f in ("layer_norm_eps", "attention_dropout", "initializer_range"):
      if f in kw:
        kw[f] = float(kw[f])
    post = get("post_layernorm_eps", None)  # our extra key (see the class docstring)
    if post is not None:
      kw["post_layernorm_eps"] = float(post)
    return cls(**kw, **runtime)

  def to_hf(self):
    from transformers import Blip2VisionConfig
    kw = {f: getattr(self, f) for f in self._HF_FIELDS}
    if self.post_eps != self.layer_norm_eps:
      kw["post_layernorm_eps"] = self.post_eps
    return Blip2VisionConfig(**kw)


def square_sizes(kw: dict) -> dict:
  """HF's `image_size` / `patch_size` in `kw` as ints, in place: HF itself computes
  `image_size // patch_size` and fails on pairs, so a pair must be square."""
  for f in ("image_size", "patch_size"):
    v = kw.get(f)
    if isinstance(v, (list, tuple)):
      if len(v) != 2 or v[0] != v[1]:
        raise ValueError(f"{f}={v!r}: only square sizes are supported (as in HF)")
      kw[f] = int(v[0])
  return kw


def lavis_qkv_bias(q_bias: np.ndarray, v_bias: np.ndarray) -> np.ndarray:
  """LAVIS/EVA `q_bias`, `v_bias` -> the fused HF `qkv.bias` [q, 0, v]."""
  q_bias, v_bias = np.asarray(q_bias), np.asarray(v_bias)
  return np.concatenate([q_bias, np.zeros_like(q_bias), v_bias])


# ----------------------------------------------------------------------------------------
# torch-exact bicubic resize (for position embeddings)


def _fma(a, b, c) -> np.ndarray:
  """float32 a * b + c rounded once, as the compiled (FMA-contracted) ATen CPU kernel does."""
  f64 = np.float64
  return (np.asarray(a, f64) * np.asarray(b, f64) + np.asarray(c, f64)).astype(np.float32)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Keys cubic-convolution weights (a = -0.75, torch's value) for taps (-1, 0, 1, 2) at t."""
  one = np.float32(1)

  def near(x):  # ((a + 2) x - (a + 3)) x x + 1, |x| <= 1
    return _fma(_fma(1.25, x, -2.25) * x, x, one)

  def far(x):  # ((a x - 5a) x + 8a) x - 4a, 1 < |x| < 2
    return _fma(_fma(_fma(-0.75, x, 3.75), x, -6.0), x, 3.0)

  t = t.astype(np.float32)
  return np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float32 matrix equal to torch `interpolate(mode="bicubic", align_corners=False)`
  along one axis with `size=` given: source = (dst + 0.5) * in / out - 0.5, taps clamped to the
  border, no anti-aliasing (also when shrinking), float32 index arithmetic and
  `guard_index_and_lambda` as in ATen. Its entries match torch's to 1 ulp (measured)."""
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  real = _fma(scale, dst + np.float32(0.5), -0.5)
  idx = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
  lam = np.clip(real - idx.astype(np.float32), 0, 1).astype(np.float32)
  w = _cubic_weights(lam)  # (out, 4)
  m = np.zeros((out_size, in_size), np.float32)
  for j in range(4):  # border taps clamp onto the same input, so their weights add up
    np.add.at(m, (np.arange(out_size), np.clip(idx - 1 + j, 0, in_size - 1)), w[:, j])
  return m


def resize_bicubic(grid: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """(..., H, W, C) -> (..., h, w, C) like torch bicubic (align_corners=False), in float32."""
  mh = jnp.asarray(bicubic_matrix(grid.shape[-3], out_hw[0]))
  mw = jnp.asarray(bicubic_matrix(grid.shape[-2], out_hw[1]))
  hp = jax.lax.Precision.HIGHEST
  g = grid.astype(jnp.float32)
  g = jnp.einsum("hH,...HWc->...hWc", mh, g, precision=hp)
  return jnp.einsum("wW,...hWc->...hwc", mw, g, precision=hp)


# ----------------------------------------------------------------------------------------
# modules


def patchify(pixel_values: jax.Array, cfg) -> tuple[jax.Array, int, int]:
  """NHWC pixels -> ((B, gh * gw, P * P * C) patches in `cfg.dtype`, gh, gw), the input of
  `PatchEmbedding`; torch's strided conv drops the rows / columns that fill no whole patch."""
  b, h, w, cin = pixel_values.shape
  p, c = cfg.patch_size, cfg.num_channels
  if cin != c:
    raise ValueError(f"pixel_values must be NHWC with {c} channels; got shape {pixel_values.shape}")
  gh, gw = h // p, w // p
  x = pixel_values[:, :gh * p, :gw * p].astype(cfg.jdtype)
  return x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c), gh, gw


def interpolate_positions(table: jax.Array, grid: int, gh: int, gw: int) -> jax.Array:
  """(1 + grid**2, D) [CLS; patch grid] position table -> (1 + gh * gw, D) float32, the patch
  grid resized like torch's bicubic `interpolate_pos_encoding` (HF BLIP-2 and CLIP alike)."""
  d = table.shape[-1]
  patch_pos = resize_bicubic(table[1:].reshape(grid, grid, d), (gh, gw)).reshape(gh * gw, d)
  return jnp.concatenate([table[:1].astype(jnp.float32), patch_pos])


class VisionEmbeddings(nn.Module):
  """Patch embedding (conv with stride = kernel, done as a matmul) + CLS + positions."""
  config: VisionConfig

  @nn.compact
  def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False):
    cfg = self.config
    dtype, pdt = cfg.jdtype, cfg.jparam_dtype
    d = cfg.hidden_size
    init = L.normal_init(cfg.initializer_range)
    class_embedding = L.param_with_axes(self, "class_embedding", init, (1, 1, d), pdt,
                                        (None, None, "embed"))
    position_embedding = L.param_with_axes(self, "position_embedding", init,
                                           (1, cfg.num_positions, d), pdt, (None, None, "embed"))

    b, h, w, _ = pixel_values.shape
    x, gh, gw = patchify(pixel_values, cfg)
    patches = PatchEmbedding(cfg, name="patch_embedding")(x)  # (B, gh * gw, D)

    cls = jnp.broadcast_to(class_embedding.astype(dtype), (b, 1, d))
    x = jnp.concatenate([cls, patches], axis=1)
    n = x.shape[1]
    if interpolate_pos_encoding and not (n == cfg.num_positions and h == w):
      pos = interpolate_positions(position_embedding[0], cfg.grid, gh, gw)[None]
    else:
      if n > cfg.num_positions:
        raise ValueError(
            f"{h}x{w} px gives {n - 1} patches but the model has {cfg.num_positions - 1} "
            "position embeddings; pass interpolate_pos_encoding=True")
      # Like HF, a smaller input silently uses the first n positions.
      pos = position_embedding[:, :n]
    x = x + pos.astype(dtype)
    return L.constrain(x, ACT)


class PatchEmbedding(nn.Module):
  """Conv2d(C, D, kernel=stride=P) on pre-extracted (B, N, P*P*C) patches: one matmul.

  The kernel is HWIO (P, P, C, D), so the checkpoint rule is the standard "conv" transform.
  use_bias=False: CLIP's conv has no bias."""
  config: VisionConfig
  use_bias: bool = True

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    cfg = self.config
    dtype, pdt = cfg.jdtype, cfg.jparam_dtype
    p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
    kernel = L.param_with_axes(self, "kernel", L.normal_init(cfg.initializer_range), (p, p, c, d),
                               pdt, (None, None, None, "embed"))
    y = jnp.dot(patches, kernel.reshape(p * p * c, d).astype(dtype))
    if not self.use_bias:
      return y
    bias = L.param_with_axes(self, "bias", nn.initializers.zeros, (d,), pdt, ("embed",))
    return y + bias.astype(dtype)


class Attention(nn.Module):
  """Blip2Attention: fused qkv (bias [q, k, v] when qkv_bias), `projection` out; `bias` is an
  optional additive mask (None here: the ViT attends everywhere). A subclass may change the
  projections (`project_qkv`, `OUT_NAME`): CLIP's separate q / k / v / out_proj (models/clip.py)."""
  config: VisionConfig
  deterministic: bool = True
  OUT_NAME = "projection"  # the output projection's parameter name

  def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, T, D) -> q, k, v, each (B, T, heads, head_dim)."""
    cfg = self.config
    d, n, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    qkv = L.dense(cfg, 3 * d, ("embed", "heads"), "qkv", use_bias=cfg.qkv_bias)(x)
    b, t = x.shape[:2]
    qkv = qkv.reshape(b, t, 3, n, hd)  # HF splits as (3, heads, head_dim)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    q, k, v = self.project_qkv(x)
    train = cfg.attention_dropout > 0 and not self.deterministic
    out = L.attention(q, k, v, bias=bias, scale=cfg.head_dim ** -0.5, implementation=cfg.attn_impl,
                      dtype=cfg.jdtype, dropout_rate=cfg.attention_dropout if train else 0.0,
                      dropout_rng=self.make_rng("dropout") if train else None)
    out = L.merge_heads(out)
    out = L.constrain(out, (BATCH, LENGTH, "activation_heads"))
    return L.dense(cfg, cfg.hidden_size, ("heads", "embed"), self.OUT_NAME)(out)


class MLP(nn.Module):
  config: VisionConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    h = L.dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "fc1")(x)
    h = L.activation(cfg.hidden_act)(h)
    h = L.constrain(h, (BATCH, LENGTH, "activation_mlp"))
    return L.dense(cfg, cfg.hidden_size, ("mlp", "embed"), "fc2")(h)


class EncoderLayer(nn.Module):
  """Blip2EncoderLayer (pre-LN). `attention` is the `self_attn` module class, called as
  `attention(config, deterministic)(h, *attention_args)`: CLIP's layer is this one with separate
  q / k / v projections and a mask (models/clip.py)."""
  config: VisionConfig
  deterministic: bool = True
  attention: Any = Attention

  @nn.compact
  def __call__(self, x: jax.Array, *attention_args) -> jax.Array:
    cfg = self.config
    h = L.norm(cfg, "layer_norm1", eps=cfg.layer_norm_eps)(x)
    x = x + self.attention(cfg, self.deterministic, name="self_attn")(h, *attention_args)
    x = L.constrain(x, ACT)
    h = L.norm(cfg, "layer_norm2", eps=cfg.layer_norm_eps)(x)
    x = x + MLP(cfg, name="mlp")(h)
    return L.constrain(x, ACT)


class VisionModel(nn.Module):
  """Blip2VisionModel. `__call__(pixel_values NHWC) -> {last_hidden_state, pooler_output}`.

  `interpolate_pos_encoding` and `deterministic` are Python bools (static under jit)."""
  config: VisionConfig

  @nn.compact
  def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False,
               deterministic: bool = True) -> dict[str, jax.Array]:
    cfg = self.config
    x = VisionEmbeddings(cfg, name="embeddings")(pixel_values, interpolate_pos_encoding)
    # `deterministic` is a layer attribute (static), so remat/scan never see a Python bool arg.
    x = L.LayerStack(EncoderLayer, {"config": cfg, "deterministic": deterministic},
                     cfg.num_hidden_layers, scan=cfg.scan, remat=cfg.remat, name="encoder")(x)
    post = L.norm(cfg, "post_layernorm", eps=cfg.post_eps)
    last = post(x)
    pooled = post(last[:, 0])  # HF normalises the CLS row a second time
    return {"last_hidden_state": L.constrain(last, ACT), "pooler_output": pooled}


# ----------------------------------------------------------------------------------------
# HF <-> Flax names (relative to Blip2VisionModel; composites prefix "vision_model.")


def hf_ignore(config: VisionConfig) -> list[str]:
  """Blip2VisionModel keeps no buffers: nothing may appear in a checkpoint without a rule."""
  return []


def hf_rules(config: VisionConfig) -> list[Rule]:
  n = config.num_hidden_layers
  lay = "encoder/layers_{i}/"
  hf = "encoder.layers.{i}."
  rules = [
      Rule("embeddings/class_embedding", "embeddings.class_embedding"),
      Rule("embeddings/position_embedding", "embeddings.position_embedding"),
      Rule("embeddings/patch_embedding/kernel", "embeddings.patch_embedding.weight", "conv"),
      Rule("embeddings/patch_embedding/bias", "embeddings.patch_embedding.bias"),
      Rule(lay + "self_attn/qkv/kernel", hf + "self_attn.qkv.weight", "linear", n),
      Rule(lay + "self_attn/projection/kernel", hf + "self_attn.projection.weight", "linear", n),
      Rule(lay + "self_attn/projection/bias", hf + "self_attn.projection.bias", "none", n),
      Rule(lay + "mlp/fc1/kernel", hf + "mlp.fc1.weight", "linear", n),
      Rule(lay + "mlp/fc1/bias", hf + "mlp.fc1.bias", "none", n),
      Rule(lay + "mlp/fc2/kernel", hf + "mlp.fc2.weight", "linear", n),
      Rule(lay + "mlp/fc2/bias", hf + "mlp.fc2.bias", "none", n),
  ]
  if config.qkv_bias:
    rules.append(Rule(lay + "self_attn/qkv/bias", hf + "self_attn.qkv.bias", "none", n))
  for ln in ("layer_norm1", "layer_norm2"):
    rules += [Rule(lay + f"{ln}/scale", hf + f"{ln}.weight", "none", n),
              Rule(lay + f"{ln}/bias", hf + f"{ln}.bias", "none", n)]
  rules += [Rule("post_layernorm/scale", "post_layernorm.weight"),
            Rule("post_layernorm/bias", "post_layernorm.bias")]
  return rules
