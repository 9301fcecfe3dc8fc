"""Matmul FLOPs of a JAX function, counted on its jaxpr.

XLA's cost analysis (`jit(f).lower(...).cost_analysis()`) counts the body of a `lax.scan` / while
loop once, whatever its trip count, so for a scanned-layer model it undercounts by about the
number of layers. Here every `dot_general` and convolution is counted with its shapes, scan
bodies are multiplied by their length and shard_map bodies (one device's shapes) by their number
of devices; what is not traced (the frozen towers' weight gradients, which are never computed) is
not counted, and what is traced twice (rematerialised forwards) is, so the figure is the work the
step really does ("hardware FLOPs"). Element-wise work is left out, as in the usual MFU accounting
(PaLM appendix B).

    n = count_flops(train_step, state, batch, rng)        # any function jax can trace
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jcore


def _dot_flops(eqn) -> float:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  rhs_free = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
  return 2.0 * math.prod(lhs) * math.prod(rhs_free)


def _conv_flops(eqn) -> float:
  out = eqn.outvars[0].aval.shape
  kernel = eqn.invars[1].aval.shape  # (out features, in features / groups, *spatial) in some order
  out_feat = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
  return 2.0 * math.prod(out) * math.prod(kernel) / out_feat  # each output: a dot of the kernel's size


def _sub_jaxprs(params: dict):
  for v in params.values():
    for x in (v if isinstance(v, (list, tuple)) else (v,)):
      if isinstance(x, jcore.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jcore.Jaxpr):
        yield x


def _manual_devices(params: dict) -> int:
  mesh = params["mesh"]
  axes = params.get("newly_manual_axes", params.get("manual_axes", mesh.axis_names))
  return math.prod(mesh.shape[a] for a in axes)


def jaxpr_flops(jaxpr) -> float:
  """Matmul FLOPs of a (closed) jaxpr, scan bodies times their length, `cond` by its costliest branch."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      total += max((jaxpr_flops(b) for b in eqn.params["branches"]), default=0.0)
    elif name == "shard_map":  # the body sees one device's shapes and runs on every device
      total += jaxpr_flops(eqn.params["jaxpr"]) * _manual_devices(eqn.params)
    else:
      inner = sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn.params))
      total += inner * (eqn.params["length"] if name == "scan" else 1)  # while: trip count unknown, once
  return total


def count_flops(fn: Callable, *args: Any, **kwargs: Any) -> float:
  """Matmul FLOPs of one call of `fn(*args, **kwargs)` (traced, not run; args may be ShapeDtypeStructs)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
