"""Progress bars for long loops (inference batches, evaluation, data conversion): tqdm on stderr."""
from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, enabled: bool = True):
  """A tqdm bar on stderr when tqdm is installed and `enabled`, else a no-op. Use it in a `with` block
  so that an error closes (clears) it first and its one line is not appended to the bar's."""
  if enabled:
    try:
      from tqdm.auto import tqdm
      return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
    except ImportError:
      pass

  class _Null:
    def update(self, n=1):
      pass

    def close(self):
      pass

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False
  return _Null()
