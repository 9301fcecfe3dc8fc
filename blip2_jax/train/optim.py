"""Freezing, weight-decay masks, the learning-rate schedule and the optimizer.

Frozen towers are partitioned out of the training tree BEFORE the optimizer sees it (`partition`
by regexes over "/"-joined parameter paths, as big_vision's config-level freezing): the
optimizer is built over the trainable subtree only, so frozen leaves carry no optimizer state,
and the train step differentiates w.r.t. the trainable subtree only, so XLA never computes (or
allocates) weight gradients of the frozen ViT / LLM.

Weight decay follows LAVIS 1.0.2 (`RunnerBase.optimizer`: no decay where `p.ndim < 2 or "bias" in n
or "ln" in n or "bn" in n`), adapted to our names, plus the issue's "none on query tokens": no decay
on leaves with fewer than 2 dimensions (biases, norm scales, the temperature), on any leaf whose
path has a component containing "bias" or "norm" (case-insensitive: LayerNorm, layernorm,
layer_norm1, final_layer_norm, input_layernorm, RMS `norm`; this also catches scanned stacks, where
a bias or norm scale is (layers, d)), a component "ln" / "ln_*", "query_tokens" or "temp". LAVIS
decays the query tokens (ndim 3); we do not. Embedding tables and kernels (ndim >= 2) are decayed.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import optax


def path_of(key_path) -> str:
  """A jax key path -> "a/b/c"."""
  parts = []
  for k in key_path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def paths(tree) -> list[str]:
  return [path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def require_matches(patterns: Sequence[str], tree, what: str) -> None:
  """ValueError naming the first of `patterns` that fully matches no leaf path of `tree`, so that a
  typo in a config's regex cannot pass silently (`what` starts the message)."""
  names = paths(tree)
  for p in patterns:
    r = re.compile(str(p))
    if not any(r.fullmatch(n) for n in names):
      raise ValueError(f"{what} {r.pattern!r} matches no parameter (paths look like {names[:3]})")


def path_mask(tree, patterns: Sequence[str]):
  """A bool tree: True where the leaf's path fully matches one of `patterns`."""
  regs = [re.compile(p) for p in patterns]
  require_matches(patterns, tree, "frozen pattern")
  return jax.tree_util.tree_map_with_path(lambda kp, _: any(r.fullmatch(path_of(kp)) for r in regs), tree)


def partition(tree, mask):
  """(trainable, frozen): two nested dicts holding the leaves where `mask` is False / True.
  Subtrees that end up empty are dropped, so each side holds only its own leaves."""
  def split(t, m, want):
    if isinstance(t, dict):
      out = {k: split(t[k], m[k], want) for k in t}
      out = {k: v for k, v in out.items() if v is not None}
      return out or None
    return t if bool(m) == want else None
  trainable = split(tree, mask, False) or {}
  frozen = split(tree, mask, True) or {}
  return trainable, frozen


def merge(trainable, frozen):
  """The inverse of `partition`."""
  if not isinstance(trainable, dict) or not isinstance(frozen, dict):
    if isinstance(trainable, dict) and not trainable:
      return frozen
    if isinstance(frozen, dict) and not frozen:
      return trainable
    raise ValueError("a leaf is both trainable and frozen")
  out = dict(frozen)
  for k, v in trainable.items():
    out[k] = merge(v, frozen[k]) if k in frozen else v
  return out


_NO_DECAY = re.compile(r"(^|/)([^/]*bias[^/]*|[^/]*norm[^/]*|ln(_[^/]*)?|query_tokens|temp)(/|$)", re.IGNORECASE)


def decay_mask(trainable):
  """True where weight decay applies (see the module docstring)."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: jnp.ndim(x) >= 2 and not _NO_DECAY.search(path_of(kp)), trainable)


def lr_schedule(peak: float, *, warmup_steps: int, total_steps: int, min_lr: float = 0.0,
                warmup_init: float = 0.0) -> optax.Schedule:
  """Linear warmup from `warmup_init` to `peak` over `warmup_steps`, then cosine decay to `min_lr`
  at `total_steps`, constant `min_lr` after.

  lr(s) = warmup_init + (peak - warmup_init) * s / warmup_steps          for s < warmup_steps
        = min_lr + (peak - min_lr) * (1 + cos(pi * (s - w) / (total - w))) / 2   up to total_steps
  Evaluated per optimizer step (the paper's stage-1/2 schedules are in steps). LAVIS's
  `linear_warmup_cosine_lr` warms up per iteration in epoch 0 only and then steps the cosine once per
  EPOCH (lr = min + (init - min) * (1 + cos(pi * epoch / max_epoch)) / 2); per-step cosine is the
  smooth version of it (pass total_steps = epochs * steps_per_epoch)."""
  warmup_steps = max(0, min(int(warmup_steps), int(total_steps)))
  decay = max(1, int(total_steps) - warmup_steps)
  cosine = optax.cosine_decay_schedule(peak, decay, alpha=(min_lr / peak) if peak else 0.0)
  if warmup_steps == 0:
    return cosine
  warm = optax.linear_schedule(warmup_init, peak, warmup_steps)
  return optax.join_schedules([warm, cosine], [warmup_steps])


_VIT = "model/vision_model/"
_VIT_LAYER = re.compile(r"^model/vision_model/encoder/layers(?:_(\d+))?/")


def vit_layer_scales(decay: float, num_layers: int):
  """Layer-wise lr decay for the ViT (BEiT / LAVIS `get_optimizer_params`) -> fn(path, leaf) -> scale:
  block i (0-based) of L gets decay ** (L - i), the embeddings (patch, class, position) decay ** (L + 1),
  anything else 1 (the Q-Former, the LLM projection, and `post_layernorm`, which is LAVIS's `ln_vision`
  outside its visual encoder). A scanned stack (path ".../encoder/layers/...", leading axis = layer)
  gets the per-layer scales as a (L, 1, ...) array along that axis, an unrolled one (".../layers_i/...")
  a scalar each, so both layouts train identically.

  LAVIS 1.0.2 computes these scales into its param groups (`lr_scale`) but its cosine scheduler
  then overwrites every group's lr with the same value, so they never take effect there; here
  they do (the BLIP-2 paper's VQA fine-tuning lists layer-wise decay 0.95)."""
  decay, num_layers = float(decay), int(num_layers)

  def scale(path: str, leaf):
    if not path.startswith(_VIT):
      return 1.0
    m = _VIT_LAYER.match(path)
    if m is None:
      return decay ** (num_layers + 1) if path.startswith(_VIT + "embeddings/") else 1.0
    if m.group(1) is not None:
      return decay ** (num_layers - int(m.group(1)))
    n = leaf.shape[0]
    if n != num_layers:
      raise ValueError(f"{path}: a scanned stack of {n} layers, but the ViT has {num_layers}")
    s = decay ** (num_layers - jnp.arange(n, dtype=jnp.float32))
    return s.reshape((n,) + (1,) * (leaf.ndim - 1))
  return scale


def scale_by_path(scale_fn) -> optax.GradientTransformation:
  """Multiplies each update by `scale_fn("a/b/c" path, update)` (a scalar or a broadcastable array):
  after AdamW this scales that leaf's learning rate (weight-decay term included), as a torch param
  group's lr multiplier does. Stateless; the paths are the trainable tree's."""
  def update(updates, state, params=None):
    del params

    def one(kp, u):
      s = scale_fn(path_of(kp), u)
      return u if isinstance(s, float) and s == 1.0 else (u * jnp.asarray(s, u.dtype)).astype(u.dtype)
    return jax.tree_util.tree_map_with_path(one, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def path_lr_scales(rules: Sequence[tuple[str, float]], what: str = "optim.lr_scales"):
  """-> fn(path, leaf) -> the factor of the first (regex, factor) rule whose regex fullmatches the
  "/"-joined path, else 1: per-module learning-rate multipliers (e.g. a ViT trained from scratch
  next to a pretrained BERT), or any other per-path factor (`what` names the setting in errors)."""
  compiled = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"{what} entries are (regex, factor) pairs, got {rule!r}")
    compiled.append((re.compile(str(rule[0])), float(rule[1])))

  def scale(path: str, leaf):
    del leaf
    return next((f for r, f in compiled if r.fullmatch(path)), 1.0)
  return scale


def make_optimizer(*, lr, b1: float = 0.9, b2: float = 0.98, weight_decay: float = 0.05,
                   clip_norm: float | None = 1.0, eps: float = 1e-8, layer_decay: float = 1.0,
                   vit_layers: int | None = None,
                   lr_scales: Sequence[tuple[str, float]] = ()) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW (decay masked by `decay_mask`), over the trainable tree;
  `layer_decay` < 1 scales the ViT's learning rates layer by layer (`vit_layer_scales`, needs
  `vit_layers`, the ViT's block count); `lr_scales` multiplies them per module (`path_lr_scales`)."""
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
  fns = []
  if layer_decay != 1.0:
    if not vit_layers:
      raise ValueError("layer_decay needs vit_layers (the number of ViT blocks)")
    fns.append(vit_layer_scales(layer_decay, vit_layers))
  if lr_scales:
    fns.append(path_lr_scales(lr_scales))
  if fns:
    def combined(path, leaf):
      out = 1.0
      for f in fns:
        out = out * f(path, leaf)
      return out
    parts.append(scale_by_path(combined))
  return optax.chain(*parts)
