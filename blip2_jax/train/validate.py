"""Config values every recipe must hold, checked before a run creates anything.

`python -m blip2_jax.train` (after its --config.KEY overrides) and `python -m blip2_jax.finetune`
(after its --set KEY=VALUE overrides) call `check_values`: a value training would fail on late
(global_batch_size=0: a ZeroDivisionError, model.dtype=float8: a TypeError, num_epochs=0 without
total_steps: no steps; data.array_record naming no ArrayRecord file or a CapFilt output without a
complete shard) is one UsageError naming the field, its value and the problem.
"""
from __future__ import annotations

import math

from blip2_jax.core.errors import UsageError
from blip2_jax.data import capfilt_shards
from blip2_jax.models import layers

# Integer fields and their smallest valid value.
INT_MINIMUM = {"global_batch_size": 1, "accum_steps": 1, "total_steps": 0, "num_epochs": 0, "log_every": 1,
               "checkpoint_every": 1, "keep_checkpoints": 1, "model.image_size": 1, "data.max_txt_len": 1,
               "optim.warmup_steps": 0, "eval.batch_size": 1, "eval.num_beams": 1, "eval.max_new_tokens": 1}
DTYPES = ("float32", "bfloat16", "float16")
_MISSING = object()


def check_values(c, *, overridden=(), prefix: str = "--set ", patch_size: int | None = None) -> None:
  """UsageError naming the first field of config `c` with a value training would fail on.

  The message reads "{prefix}KEY=VALUE: problem" for a field in `overridden` (the user set it:
  prefix "--set " or "--config."), "config KEY=VALUE: problem" for one the recipe set. Fields a
  recipe lacks are not checked. `patch_size`: the ViT's, when known (image_size must be a multiple);
  default: the recipe's model.hf_config.vision_config.patch_size, if it has one."""
  def fail(key, problem):
    where = prefix if key in overridden else "config "
    raise UsageError(f"{where}{key}={_show(get(c, key))}: {problem}")

  for key, low in INT_MINIMUM.items():
    v = get(c, key)
    if v is _MISSING:
      continue
    if not _is_int(v):
      fail(key, "expected an integer")
    if int(v) < low:
      fail(key, f"must be at least {low}")
  if get(c, "num_epochs") is not _MISSING and _int(c, "total_steps") == 0 and _int(c, "num_epochs") == 0:
    fail("num_epochs", "must be at least 1 (or set total_steps): the run would have no steps")
  batch, accum = _int(c, "global_batch_size"), _int(c, "accum_steps")
  if batch and accum and batch % accum:
    fail("accum_steps", f"must divide global_batch_size ({batch})")
  for key, allowed in (("model.dtype", DTYPES), ("model.frozen_dtype", DTYPES + ("",))):
    if get(c, key) not in (_MISSING,) + allowed:
      fail(key, f"expected one of {', '.join(DTYPES)}")
  remat = get(c, "model.remat")
  if remat is not _MISSING:
    if remat not in layers.REMAT_POLICIES:
      fail("model.remat", f"expected one of {', '.join(layers.REMAT_POLICIES)}")
  patch = patch_size or _recipe_patch_size(c)
  if patch and _int(c, "model.image_size") % patch:
    fail("model.image_size", f"must be a multiple of the ViT's patch size {patch}")
  for key, ok, what in (("optim.lr", lambda v: 0 <= v < math.inf, "must be a finite number >= 0"),
                        ("optim.layer_decay", lambda v: 0 < v <= 1, "must be in (0, 1]")):
    v = get(c, key)
    if v is not _MISSING and not (_is_number(v) and ok(float(v))):
      fail(key, what)
  if get(c, "data.source") == "array_record" and get(c, "data.array_record"):
    try:  # files that are not there, or a CapFilt output without a complete shard
      capfilt_shards.array_record_paths(get(c, "data.array_record"))
    except (FileNotFoundError, ValueError) as e:
      fail("data.array_record", str(e))
  mesh = get(c, "mesh")
  if mesh is not _MISSING:
    mesh = tuple(mesh) if isinstance(mesh, (tuple, list)) else (mesh,)
    if len(mesh) != 3 or any(not _is_int(m) or (m < 1 and m != -1) for m in mesh) or mesh.count(-1) > 1:
      fail("mesh", "expected data,fsdp,tensor: three integers >= 1, one of them may be -1 (the remaining devices)")


def get(c, key: str, default=_MISSING):
  """c[KEY] for a dotted key; `default` when a part is missing."""
  node = c
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return default
  return node


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(c, key: str) -> int:
  v = get(c, key, 0)
  return int(v) if _is_int(v) else 0


def _recipe_patch_size(c) -> int | None:
  v = get(c, "model.hf_config.vision_config.patch_size", None)
  return int(v) if _is_int(v) and v > 0 else None


def _show(v) -> str:
  return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
