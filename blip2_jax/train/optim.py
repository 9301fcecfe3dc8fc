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


def path_mask(tree, patterns: Sequence[str]):
  """A bool tree: True where the leaf's path fully matches one of `patterns`."""
  regs = [re.compile(p) for p in patterns]
  for r in regs:
    if not any(r.fullmatch(p) for p in paths(tree)):
      raise ValueError(f"frozen pattern {r.pattern!r} matches no parameter (paths look like {paths(tree)[:3]})")
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


def make_optimizer(*, lr, b1: float = 0.9, b2: float = 0.98, weight_decay: float = 0.05,
                   clip_norm: float | None = 1.0, eps: float = 1e-8) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW (decay masked by `decay_mask`), over the trainable tree."""
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts)
