"""Mesh construction, the logical-axis rule table, and multi-process start-up (`initialize_distributed`).

Modules name their axes (see models/layers.py); this table maps the names to mesh axes
(data, fsdp, tensor). Changing parallelism is a config edit, not a code edit.
"""
from __future__ import annotations

import os
import warnings
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Parameters shard their large dimension over fsdp and the
# head / mlp / vocab dimension over tensor; activations shard the batch over data+fsdp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axes: Sequence[str] = MESH_AXES,
              devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one -1 entry takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(axes):
    raise ValueError(f"mesh shape {shape} does not match axes {tuple(axes)}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape} has more than one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh shape {shape}")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"but {len(devices)} are available")
  types = (AxisType.Auto,) * len(axes)
  try:  # on TPUs, laid out along the physical torus
    return jax.make_mesh(tuple(shape), tuple(axes), devices=devices, axis_types=types)
  except (ValueError, NotImplementedError):
    # an axis that fits no torus dimension (8 on a 4x4x4 slice) spans two of them
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(tuple(shape), devices, allow_split_physical_axes=True)
    return Mesh(grid, tuple(axes), axis_types=types)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None], rules=DEFAULT_RULES):
  return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(logical_axes), rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(abstract, mesh: Mesh, rules=DEFAULT_RULES, *, warn: bool = True):
  """NamedShardings of the leaves of `abstract` (a tree of boxed, logically partitioned leaves, e.g.
  from eval_shape(init); unboxed leaves are replicated) under the logical axis `rules`.

  A dimension its mesh axes do not evenly divide is replicated over them instead (`fit_spec`), with
  one warning listing such leaves: real checkpoints have odd vocabularies (Q-Former 30523, Vicuna +
  pad 32001) that would otherwise fail to load."""
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  notes = []

  def fit(path, sh, leaf):
    spec, dropped = fit_spec(sh.spec, tuple(leaf.shape), mesh)
    if not dropped:
      return sh
    notes.append(f"{jax.tree_util.keystr(path, simple=True, separator='/')} {tuple(leaf.shape)}: " + "; ".join(dropped))
    return NamedSharding(mesh, spec, memory_kind=sh.memory_kind)

  out = jax.tree_util.tree_map_with_path(fit, shardings, nn.unbox(abstract))
  if notes and warn:
    warnings.warn(f"{len(notes)} parameters have dimensions their mesh axes do not divide; those "
                  "dimensions are replicated instead:\n  " + "\n  ".join(notes[:20])
                  + ("\n  ..." if len(notes) > 20 else ""), stacklevel=2)
  return out


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> tuple[P, list[str]]:
  """`spec` with the mesh axes that do not evenly divide their array dimension dropped.

  Real checkpoints have such dimensions (the Q-Former vocab 30523, Vicuna's 32001 with the
  added pad token); those dimensions are replicated over the dropped axes instead of failing.
  Axes of a tuple entry are kept left to right while their product divides the dimension.
  Returns (spec, ["dim d (size n): dropped 'axis' (k)", ...]).
  """
  entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  out, dropped = [], []
  for d, (size, entry) in enumerate(zip(shape, entries)):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    keep, n = [], 1
    for a in axes:
      k = mesh.shape[a]
      if size % (n * k) == 0:
        keep.append(a)
        n *= k
      else:
        dropped.append(f"dim {d} (size {size}): dropped {a!r} ({k})")
    out.append(None if not keep else keep[0] if len(keep) == 1 and isinstance(entry, str) else tuple(keep))
  if not dropped:
    return spec, []  # unchanged, so it compares equal to the rule-given spec
  return P(*out[:len(tuple(spec))]), dropped


def auto_distributed() -> bool:
  """True under a multi-process launcher: a JAX coordinator, SLURM with more than one task, or a TPU pod."""
  env = os.environ
  return any(k in env for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES")) and \
      int(env.get("SLURM_NTASKS", "2")) > 1


def initialize_distributed(requested: bool, *, coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """jax.distributed.initialize() when `requested` or `auto_distributed()`, before any backend starts
  (the command lines' --distributed); arguments the environment does not provide may be given.
  Returns whether it initialised."""
  if not (requested or auto_distributed()):
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects CPU devices (tests, CPU runs)
  kw = {k: v for k, v in dict(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id).items() if v is not None}
  jax.distributed.initialize(**kw)
  return True
