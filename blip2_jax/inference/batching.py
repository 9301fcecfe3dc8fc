"""Fixed-shape batching: every batch has the same rows (the last one padded), so each inference
function compiles once per model and batch size."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from blip2_jax.core.progress import progress_bar


def padded_batches(n: int, batch_size: int) -> Iterable[tuple[int, int]]:
  for start in range(0, n, batch_size):
    yield start, min(start + batch_size, n)


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  pad = np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad])


def map_batched(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int, desc: str,
                 progress: bool) -> list[np.ndarray]:
  """Applies `fn(*batch)` -> tuple of arrays over rows in fixed-size batches; concatenates results."""
  n = arrays[0].shape[0]
  outs: list[list[np.ndarray]] = []
  with progress_bar(n, desc, progress) as bar:
    for s, e in padded_batches(n, batch_size):
      res = fn(*[jnp.asarray(pad_rows(a[s:e], batch_size)) for a in arrays])
      res = res if isinstance(res, tuple) else (res,)
      outs.append([np.asarray(r)[: e - s] for r in res])
      bar.update(e - s)
  return [np.concatenate(col) for col in zip(*outs)]


def pad_repeat(x: np.ndarray, rows: int) -> np.ndarray:
  """Pads to `rows` rows by repeating row 0 (valid inputs: no all-masked rows in padding)."""
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.repeat(x[:1], rows - x.shape[0], axis=0)])
