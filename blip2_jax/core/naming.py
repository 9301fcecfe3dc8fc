"""HF <-> Flax name tables as data.

A table is a list of `Rule`s. Each rule names one leaf of the UNROLLED Flax parameter tree
("/"-joined path, layers as `layers_{i}`) and the Hugging Face state-dict key it comes from,
plus a named transform. `{i}` in both names is expanded over `range(layers)`.
Scanned trees are converted from/to the unrolled layout by `layers.unrolled_to_scan`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np


def _conv_to_flax(w):  # torch OIHW -> flax HWIO
  return np.transpose(w, (2, 3, 1, 0))


def _conv_to_hf(w):
  return np.transpose(w, (3, 2, 0, 1))


# name -> (hf -> flax, flax -> hf)
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "none": (lambda w: w, lambda w: w),
    "linear": (lambda w: np.transpose(w), lambda w: np.transpose(w)),  # torch (out, in) <-> (in, out)
    "conv": (_conv_to_flax, _conv_to_hf),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  flax: str
  hf: str
  transform: str = "none"
  layers: int = 0  # > 0: expand "{i}" over range(layers)

  def __post_init__(self):
    if self.transform not in TRANSFORMS:
      raise ValueError(f"unknown transform {self.transform!r} in rule for {self.hf}")


def expand(rules: Iterable[Rule]) -> list[Rule]:
  out = []
  for r in rules:
    if r.layers:
      out.extend(dataclasses.replace(r, flax=r.flax.format(i=i), hf=r.hf.format(i=i), layers=0)
                 for i in range(r.layers))
    else:
      out.append(r)
  return out


def prefixed(rules: Iterable[Rule], flax_prefix: str, hf_prefix: str) -> list[Rule]:
  """Mounts a sub-model's table under a composite: flax 'a/b' -> 'pre/a/b', hf 'x' -> 'pre.x'."""
  return [dataclasses.replace(r, flax=flax_prefix + r.flax, hf=hf_prefix + r.hf) for r in rules]
