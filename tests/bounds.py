"""The float32 parity bound every comparison with PyTorch uses.

Round-off moves with library releases, thread counts and XLA versions, so a bound set at a measured
figure breaks with the next transformers. The goal instead: 1e-5 on values of order 1, scaled by the
magnitude of larger values (`REL` times the largest |reference|, never below `REL`). Each test keeps
the figure it measured in a comment beside its call.

    d = assert_close(ours, theirs, "vision last_hidden_state")   # returns the max abs diff
"""
from __future__ import annotations

import numpy as np

REL = 1e-5
# bf16 compute against float32 torch: four bf16 epsilons (2^-7 each) of the largest magnitude (the
# round-off of an 8-bit mantissa, scaled the same way; GPU kernels round differently from the CPU's).
BF16_REL = 2.0 ** -5
# bf16 weights as well as bf16 compute: every weight is rounded too, so eight.
BF16_WEIGHTS_REL = 2.0 ** -4


def _np(x) -> np.ndarray:
  if hasattr(x, "detach"):  # torch
    x = x.detach().float().numpy()
  return np.asarray(x, np.float64)


def bound(ref, rel: float = REL) -> float:
  """`rel` times the largest magnitude in `ref`, at least `rel`."""
  r = _np(ref)
  return rel * max(1.0, float(np.abs(r).max()) if r.size else 1.0)


def max_diff(a, b) -> float:
  a, b = _np(a), _np(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max()) if a.size else 0.0


def assert_close(got, ref, what: str = "", rel: float = REL) -> float:
  """Asserts max |got - ref| <= bound(ref, rel); returns the difference (for a caller's own report)."""
  d, b = max_diff(got, ref), bound(ref, rel)
  assert d <= b, f"{what}: max abs diff {d:.3g} above the bound {b:.3g} ({rel:g} x max(1, max |ref|))"
  return d
