"""Refusing non-finite numbers: a model whose weights or inputs hold NaN / inf gives NaN scores, and a
metric computed on them looks like a result (NaN compares false, so a NaN row ranks anything first).
Metrics, retrieval and generation check their numbers with `check_finite` and raise `NonFiniteError`,
which the command lines print as one line with exit status 1."""
from __future__ import annotations

import numpy as np


class NonFiniteError(ValueError):
  """Scores, features or logits hold NaN or infinite values; the message says which and how many."""


HINT = "the model's weights or its inputs hold NaN / inf"


def check_finite(x, what: str, hint: str = HINT) -> np.ndarray:
  """`x` as a numpy array; NonFiniteError naming `what`, how many values are NaN / infinite and
  `hint` when any is."""
  a = np.asarray(x)
  if not np.issubdtype(a.dtype, np.floating):
    return a
  bad = ~np.isfinite(a)
  if bad.any():
    nan = int(np.isnan(a).sum())
    kinds = ", ".join(s for s in (f"{nan} NaN" if nan else "", f"{int(bad.sum()) - nan} infinite"
                                  if bad.sum() > nan else "") if s)
    raise NonFiniteError(f"{what}: {int(bad.sum())} of {a.size} values are not finite ({kinds}); {hint}")
  return a
