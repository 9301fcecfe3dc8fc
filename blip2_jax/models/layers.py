"""Shared layers: the only place attention, norms, dense layers, activations, the token
cross-entropy and layer stacking (scan / remat / unrolled) are written, and the runtime fields
every model config inherits (`Runtime`) with the factories that build layers from them
(`dense`, `norm`, `embed`).

Logical axis names used on parameters and activations (mapped to mesh axes by
`blip2_jax.core.sharding`):
  params:      embed, mlp, heads (= num_heads * head_dim, flattened), kv_heads, vocab,
               layers (the scan axis), norm, patch, pos, relpos
  activations: activation_batch, activation_length, activation_embed, activation_mlp,
               activation_heads, activation_vocab
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Array = jax.Array

BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"

IGNORE_INDEX = -100  # label id that carries no loss (torch / HF ignore_index)


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  """Annotates an activation with logical axis names (a no-op without rules)."""
  return nn.with_logical_constraint(x, tuple(axes))


def dtype_of(name_or_dtype) -> Any:
  if isinstance(name_or_dtype, str):
    return jnp.dtype(name_or_dtype)
  return name_or_dtype


# ----------------------------------------------------------------------------------------
# runtime fields


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runtime:
  """The fields every model config carries besides its HF ones: how to run, not what to compute.

  Model configs inherit them; keyword-only, so a config's own fields keep their positions.
  `attn_impl` is `attention`'s implementation (None, "xla", "cudnn")."""
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan: bool = False
  remat: str = "none"
  attn_impl: str | None = None

  def __post_init__(self):
    remat_policy(self.remat)  # fails early on an unknown policy

  @property
  def jdtype(self):
    """The compute dtype as a jnp dtype."""
    return dtype_of(self.dtype)

  @property
  def jparam_dtype(self):
    return dtype_of(self.param_dtype)

  @property
  def weight_std(self) -> float:
    """Std of fresh normal kernels and embeddings (`dense`, `embed`): HF's `initializer_range`;
    configs that name it otherwise override this."""
    return self.initializer_range

  @property
  def runtime(self) -> dict:
    return {f: getattr(self, f) for f in RUNTIME_FIELDS}

  def replace_runtime(self, **runtime):
    """A copy with other runtime fields (TypeError naming unknown ones)."""
    check_runtime(runtime)
    return dataclasses.replace(self, **runtime)


RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(Runtime))


def check_runtime(runtime: dict) -> None:
  bad = set(runtime) - set(RUNTIME_FIELDS)
  if bad:
    raise TypeError(f"unknown option(s) {sorted(bad)}; expected some of {RUNTIME_FIELDS}")


# ----------------------------------------------------------------------------------------
# activations


def _gelu_exact(x):
  return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


def activation(name: str) -> Callable[[Array], Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# ----------------------------------------------------------------------------------------
# parameters


def normal_init(std: float):
  return nn.initializers.normal(stddev=std)


def param_with_axes(module: nn.Module, name: str, init, shape, dtype, axes):
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, dtype)


class Dense(nn.Module):
  """y = x @ kernel + bias, kernel (in, out) with logical axes; computes in `dtype`."""
  features: int
  axes: tuple[str, str] = ("embed", "mlp")
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = param_with_axes(self, "kernel", normal_init(self.init_std),
                             (x.shape[-1], self.features), self.param_dtype, self.axes)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = param_with_axes(self, "bias", nn.initializers.zeros, (self.features,),
                             self.param_dtype, self.axes[-1:])
      y = y + bias.astype(self.dtype)
    return y


class Embed(nn.Module):
  """Token embedding table (vocab, embed); `attend` gives tied-head logits."""
  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02
  axes: tuple[str, str] = ("vocab", "embed")
  scale: float | None = None  # Gemma: rows times sqrt(hidden), in the table's dtype (as HF)

  def setup(self):
    self.embedding = param_with_axes(self, "embedding", normal_init(self.init_std),
                                     (self.num_embeddings, self.features), self.param_dtype,
                                     self.axes)

  def __call__(self, ids: Array) -> Array:
    x = jnp.take(self.embedding, ids, axis=0)
    if self.scale is not None:
      x = x * jnp.asarray(np.float32(self.scale), x.dtype)
    return x.astype(self.dtype)

  def attend(self, x: Array) -> Array:
    return jnp.dot(x.astype(self.dtype), self.embedding.astype(self.dtype).T)


class LayerNorm(nn.Module):
  """LayerNorm (or RMSNorm with rms=True) whose statistics are always float32.
  use_scale=use_bias=False gives the parameter-free norm (OPT's elementwise_affine=False).
  scale_offset 1.0 is Gemma's RMSNorm: weight initialised at 0, output x_hat * (1 + weight) in float32."""
  eps: float = 1e-5
  rms: bool = False
  use_bias: bool = True
  use_scale: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scale_offset: float = 0.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    xf = x.astype(jnp.float32)
    if self.rms:
      xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    else:
      mean = jnp.mean(xf, axis=-1, keepdims=True)
      xf = xf - mean
      xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    if not self.use_scale:
      y = xf
      if self.use_bias:
        y = y + param_with_axes(self, "bias", nn.initializers.zeros, (d,), self.param_dtype,
                                ("norm",)).astype(jnp.float32)
      return y.astype(self.dtype)
    if self.scale_offset:
      scale = param_with_axes(self, "scale", nn.initializers.zeros, (d,), self.param_dtype, ("norm",))
      return (xf * (self.scale_offset + scale.astype(jnp.float32))).astype(self.dtype)
    scale = param_with_axes(self, "scale", nn.initializers.ones, (d,), self.param_dtype, ("norm",))
    if self.rms:
      # HF T5/LLaMA cast the normalised value to the weight dtype before scaling.
      return (scale * xf.astype(self.param_dtype)).astype(self.dtype)
    y = xf * scale.astype(jnp.float32)
    if self.use_bias:
      bias = param_with_axes(self, "bias", nn.initializers.zeros, (d,), self.param_dtype, ("norm",))
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def dense(cfg: Runtime, features: int, axes: Sequence[str | None], name: str | None = None, *,
          use_bias: bool = True, init_std: float | None = None) -> Dense:
  """A `Dense` in the config's dtypes; init_std None: `cfg.weight_std`."""
  return Dense(features, axes=tuple(axes), use_bias=use_bias, dtype=cfg.jdtype,
               param_dtype=cfg.jparam_dtype,
               init_std=cfg.weight_std if init_std is None else init_std, name=name)


def norm(cfg: Runtime, name: str | None = None, *, eps: float, rms: bool = False,
         affine: bool = True, scale_offset: float = 0.0) -> LayerNorm:
  """LayerNorm (params `scale`, `bias`), or RMSNorm with rms=True (`scale` only), in the config's
  dtypes; affine=False: no parameters (OPT's elementwise_affine=False); scale_offset 1.0: Gemma's
  (1 + weight) RMSNorm."""
  return LayerNorm(eps=eps, rms=rms, use_scale=affine, use_bias=affine and not rms,
                   dtype=cfg.jdtype, param_dtype=cfg.jparam_dtype, scale_offset=scale_offset,
                   name=name)


def embed(cfg: Runtime, num_embeddings: int, features: int, name: str | None = None, *,
          axes: tuple[str | None, str | None] = ("vocab", "embed"),
          init_std: float | None = None, scale: float | None = None) -> Embed:
  """An `Embed` table in the config's dtypes; init_std None: `cfg.weight_std`; `scale` multiplies
  the looked-up rows (not the tied head)."""
  return Embed(num_embeddings, features, dtype=cfg.jdtype, param_dtype=cfg.jparam_dtype,
               init_std=cfg.weight_std if init_std is None else init_std, axes=axes, scale=scale,
               name=name)


# ----------------------------------------------------------------------------------------
# loss


def cross_entropy(logits: Array, labels: Array, *, label_smoothing: float = 0.0,
                  ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> Array:
  """torch.nn.functional.cross_entropy over the last axis, in float32: label smoothing as torch
  ((1 - e) * nll + e * mean over classes of -log p), `ignore_index` rows dropped, "mean" over the
  kept rows (0 when none) or "sum". With the defaults it is HF's LM loss."""
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  labels = jnp.asarray(labels)
  keep = labels != ignore_index
  safe = jnp.where(keep, labels, 0)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
  total = jnp.sum(jnp.where(keep, nll, 0.0))
  if reduction == "sum":
    return total
  return total / jnp.maximum(jnp.sum(keep), 1).astype(jnp.float32)


# ----------------------------------------------------------------------------------------
# attention


def split_heads(x: Array, num_heads: int) -> Array:
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: Array) -> Array:
  return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def mask_to_bias(mask: Array | None, dtype=jnp.float32) -> Array | None:
  """Boolean/0-1 mask (..., S) or (..., T, S) -> additive float32 bias (large negative)."""
  if mask is None:
    return None
  return jnp.where(mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min).astype(dtype)


def _full_bias(bias: Array) -> Array:
  """(B,S) / (B,T,S) / 4-D bias -> 4-D, clamped so bias + logits never overflows to -inf (rows
  fully masked stay finite, as HF's dtype-min masks do)."""
  while bias.ndim < 4:
    bias = bias[:, None] if bias.ndim == 3 else bias[:, None, None, :]
  return jnp.maximum(bias, jnp.finfo(jnp.float32).min / 2)


def softcap(x: Array, cap: float | None) -> Array:
  """Gemma's soft-capping, cap * tanh(x / cap), in x's dtype (None: x unchanged)."""
  if cap is None:
    return x
  return jnp.tanh(x / jnp.asarray(cap, x.dtype)) * jnp.asarray(cap, x.dtype)


def attention(q: Array, k: Array, v: Array, *, bias: Array | None = None,
              scale: float | None = None, is_causal: bool = False,
              implementation: str | None = None, dtype: Dtype = jnp.float32,
              dropout_rate: float = 0.0, dropout_rng: Array | None = None,
              logit_softcap: float | None = None) -> Array:
  """Multi-head attention core on (B, T, N, H) tensors; K may have fewer heads (GQA).

  `bias` is additive, broadcastable to (B, N, T, S), in float32 ((B, S) and (B, T, S) are
  expanded). Logits and softmax run in float32 even for bf16 inputs.
  implementation: None (let JAX choose), "xla" or "cudnn" (`jax.nn.dot_product_attention`);
  cuDNN has no float32 kernel, so float32 attention (the Q-Former, parity runs) uses "xla".
  With `dropout_rate > 0` and a `dropout_rng` (training), the probabilities are dropped as HF
  does, on an explicit softmax path (the fused kernels have no dropout). `logit_softcap` (Gemma 2:
  cap * tanh(logits / cap) on the scaled logits, before the bias, as HF's eager attention) also
  takes the explicit path: the fused kernels have no soft-capping.
  """
  q, k, v = (t.astype(dtype) for t in (q, k, v))
  if bias is not None:
    bias = _full_bias(bias)
  dropout = dropout_rate > 0.0 and dropout_rng is not None
  if dropout or logit_softcap is not None:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if k.shape[2] != q.shape[2]:  # GQA: repeat the key/value heads
      k, v = (jnp.repeat(t, q.shape[2] // k.shape[2], axis=2) for t in (k, v))
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    logits = softcap(logits, logit_softcap)
    if bias is not None:
      logits = logits + bias
    if is_causal:
      logits = logits + causal_bias(q.shape[1], k.shape[1])
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout:
      keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
      probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bnts,bsnh->btnh", probs.astype(dtype), v).astype(dtype)
  if implementation == "cudnn" and jnp.dtype(dtype) == jnp.float32:
    implementation = "xla"
  if bias is not None:
    if implementation == "cudnn":
      # cuDNN wants the bias in the input dtype with full query/key lengths.
      bias = jnp.broadcast_to(bias, bias.shape[:2] + (q.shape[1], k.shape[1])).astype(q.dtype)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=is_causal,
                                     implementation=implementation)
  return out.astype(dtype)


def causal_bias(t: int, s: int | None = None, offset: int = 0) -> Array:
  """(1, 1, T, S) additive causal bias; query i sees keys <= i + offset."""
  s = t if s is None else s
  allowed = jnp.arange(s)[None, :] <= (jnp.arange(t)[:, None] + offset)
  return mask_to_bias(allowed)[None, None]


def _causal_allowed(t: int, s: int, offset, window: int | None) -> Array:
  """(T, S) booleans: query i (at slot i + offset) sees key slot j <= i + offset, and with a
  sliding `window` only the last `window` slots, j > i + offset - window (HF's index-based
  `sliding_window_overlay`: left padding counts as slots)."""
  q, j = jnp.arange(t)[:, None] + offset, jnp.arange(s)[None, :]
  allowed = j <= q
  if window is not None:
    allowed = allowed & (j > q - window)
  return allowed


def cached_causal_bias(key_mask: Array | None, t: int, s: int, index, window: int | None = None) -> Array:
  """(B|1, 1, T, S) bias for T queries written at cache slots index..index+T-1 of an S-slot
  key/value cache: slot j is visible to query i if j <= index + i and key_mask[j] (B, S), and
  with a sliding `window`, j > index + i - window."""
  allowed = _causal_allowed(t, s, index, window)[None, None]
  if key_mask is not None:
    allowed = allowed & key_mask.astype(bool)[:, None, None, :]
  return mask_to_bias(allowed)


def cache_update(cache: Array, new: Array, index) -> Array:
  """Writes `new` (B, T, N, H) into a head-major key/value cache (B, N, S, H) at slots
  index..index+T-1 (traced index). Head-major because each decode step reads the whole cache
  and the dots want batch and head axes leading: a (B, S, N, H) cache was copied into that
  layout, every layer, every step."""
  new = jnp.swapaxes(new, 1, 2).astype(cache.dtype)
  return jax.lax.dynamic_update_slice(cache, new, (0, 0, index, 0))


def cached_attention(q: Array, k: Array, v: Array, *, bias: Array | None = None,
                     scale: float | None = None, dtype: Dtype = jnp.float32,
                     logit_softcap: float | None = None) -> Array:
  """`attention` of (B, T, N, H) queries over a head-major (B, K, S, H) key/value cache (K
  divides N: GQA), the same float32 logits and softmax as the XLA path of
  `jax.nn.dot_product_attention`, without moving the cache (`logit_softcap` as `attention`).
  -> (B, T, N, H)."""
  q, k, v = (t.astype(dtype) for t in (q, k, v))
  b, t, n, h = q.shape
  kh = k.shape[1]
  scale = h ** -0.5 if scale is None else scale
  q = q.reshape(b, t, kh, n // kh, h)  # query head n = kv head n // G, group member n % G
  logits = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = softcap(logits * jnp.asarray(scale, jnp.float32), logit_softcap)
  if bias is not None:
    bias = _full_bias(bias)
    bias = (bias[:, :, None] if bias.shape[1] == 1
            else bias.reshape(bias.shape[0], kh, n // kh, *bias.shape[2:]))
    logits = logits + bias
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksh->btkgh", probs, v)
  return out.reshape(b, t, n, h).astype(dtype)


def causal_padding_bias(mask: Array | None, t: int, window: int | None = None) -> Array:
  """(B|1, 1, T, T) additive bias: index-causal (within the last `window` positions, if given)
  and, if `mask` (B, T) is given, key padding."""
  allowed = _causal_allowed(t, t, 0, window)[None, None]
  if mask is not None:
    allowed = allowed & mask.astype(bool)[:, None, None, :]
  return mask_to_bias(allowed)


# ----------------------------------------------------------------------------------------
# layer stacks: scan or unrolled, with remat


REMAT_POLICIES = {
    "none": None,  # no remat
    "full": "nothing_saveable",  # recompute everything in the backward pass
    "dots": "dots_saveable",  # keep matmul outputs
    "dots_no_batch": "dots_with_no_batch_dims_saveable",
    "everything": "everything_saveable",
}


def remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; known: {sorted(REMAT_POLICIES)}")
  return getattr(jax.checkpoint_policies, REMAT_POLICIES[name]) if REMAT_POLICIES[name] else None


class LayerStack(nn.Module):
  """Applies `num_layers` copies of `layer_cls(**layer_kwargs)` to a carry.

  Each layer is called as `layer(x, *broadcast_args) -> x`. With `scan=True` the parameters
  have a leading "layers" axis under the name `layers`; unrolled, each layer is `layers_{i}`.
  `convert_params` turns one tree into the other.
  `kinds` (one int per layer, e.g. local / global attention) gives every layer its own as a
  keyword `kind=` (an int32 scalar, scanned along with the layers): a layer chooses between
  variants of its arguments with `pick`, so one scanned body serves layers that differ.
  """
  layer_cls: Any
  layer_kwargs: dict
  num_layers: int
  scan: bool = False
  remat: str = "none"
  kinds: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, x, *args, xs=None):
    """Without `xs`: layer(x, *args) -> x, returns x.

    With `xs` (a pytree whose leaves have a leading layer axis, e.g. a key/value cache): layer i
    is called as layer(x, *args, xs_i) -> (x, ys_i) and the stack returns (x, ys), ys stacked on
    a leading layer axis (scanned inputs/outputs of nn.scan; sliced and re-stacked unrolled)."""
    cls = self.layer_cls
    policy = remat_policy(self.remat)
    if self.remat != "none":
      cls = nn.remat(cls, policy=policy, prevent_cse=not self.scan)
    kinds = None
    if self.kinds is not None:
      if len(self.kinds) != self.num_layers:
        raise ValueError(f"{len(self.kinds)} layer kinds for {self.num_layers} layers")
      kinds = jnp.asarray(self.kinds, jnp.int32)
    if self.scan:
      if kinds is not None:
        body = lambda mdl, c, kx: (mdl(c, *args, kind=kx[0]), None) if xs is None else mdl(
            c, *args, kx[1], kind=kx[0])
        xs_in = (kinds, xs)
      elif xs is None:
        body, xs_in = (lambda mdl, c, _: (mdl(c, *args), None)), xs
      else:
        body, xs_in = (lambda mdl, c, xi: mdl(c, *args, xi)), xs
      scanned = nn.scan(
          body,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          length=self.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, ys = scanned(cls(**self.layer_kwargs, name="layers"), x, xs_in)
      return x if xs is None else (x, ys)
    ys = []
    for i in range(self.num_layers):
      layer = cls(**self.layer_kwargs, name=f"layers_{i}")
      kw = {} if kinds is None else {"kind": kinds[i]}
      if xs is None:
        x = layer(x, *args, **kw)
      else:
        x, y = layer(x, *args, jax.tree_util.tree_map(lambda a: a[i], xs), **kw)
        ys.append(y)
    if xs is None:
      return x
    return x, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ys)


def pick(options: Sequence[Any], kind) -> Any:
  """`options[kind]` for a layer's `kind` (see LayerStack.kinds; may be traced): the chosen
  pytree, selected elementwise (exact), so scanned and unrolled stacks agree bit for bit."""
  if len(options) == 1:
    return options[0]
  return jax.tree_util.tree_map(lambda *c: jax.lax.select_n(kind, *c), *options)


_UNROLLED = re.compile(r"^layers_(\d+)$")


def scan_to_unrolled(tree: dict) -> dict:
  """Converts every `layers` subtree (leading layer axis) into `layers_{i}` subtrees."""
  out = {}
  for k, v in tree.items():
    if k == "layers" and isinstance(v, dict):
      n = jax.tree_util.tree_leaves(v)[0].shape[0]
      for i in range(n):
        out[f"layers_{i}"] = scan_to_unrolled(jax.tree_util.tree_map(lambda a: a[i], v))
    elif isinstance(v, dict):
      out[k] = scan_to_unrolled(v)
    else:
      out[k] = v
  return out


def unrolled_to_scan(tree: dict) -> dict:
  """Stacks `layers_{i}` subtrees into one `layers` subtree with a leading layer axis."""
  out, stacks = {}, {}
  for k, v in tree.items():
    m = _UNROLLED.match(k)
    if m and isinstance(v, dict):
      stacks[int(m.group(1))] = unrolled_to_scan(v)
    elif isinstance(v, dict):
      out[k] = unrolled_to_scan(v)
    else:
      out[k] = v
  if stacks:
    if sorted(stacks) != list(range(len(stacks))):
      raise ValueError(f"layer indices are not contiguous: {sorted(stacks)}")
    layers = [stacks[i] for i in range(len(stacks))]
    stack = np.stack if isinstance(jax.tree_util.tree_leaves(layers[0])[0], np.ndarray) else jnp.stack
    out["layers"] = jax.tree_util.tree_map(lambda *xs: stack(xs), *layers)
  return out


def config_replace(cfg, **kw):
  return dataclasses.replace(cfg, **kw)
