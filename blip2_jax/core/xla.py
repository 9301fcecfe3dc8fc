"""`jax.jit` with per-backend compiler presets: what XLA:CPU runs fastest differs by program kind.

    step = xla.jit(fn)                                  # decoding: single-dot YNNPACK fusions
    image = xla.jit(fn, xla.CPU_NO_LIBRARY_FUSIONS)     # inference forwards: none

Other backends get plain `jax.jit`.
"""
from __future__ import annotations

from typing import Callable

import jax

# XLA:CPU's default library fusions (YNNPACK) take a matmul together with what reads its output:
# in beam search the log-softmax's row max went into the LM head's (80 x 512) @ (512 x 50304)
# matmul, and that fusion ran 3x slower than the matmul alone (98 ms vs 32 ms a step). Decoding
# programs on the CPU let YNNPACK take single matmuls only: batch 16, 5 beams 5.4 s -> 3.5 s.
CPU_DECODING = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
# Inference forwards (retrieval's ViT / Q-Former passes) ran fastest with no library fusions at
# all: the small ViT at batch 32 took 2.77 s by default, 1.95 s with single-dot fusions, 1.51 s
# without XNNPACK / YNNPACK (HF's vision model: 1.49 s).
CPU_NO_LIBRARY_FUSIONS = {"xla_cpu_use_xnnpack": False, "xla_cpu_experimental_ynn_fusion_type": ""}


def jit(fn: Callable, cpu_options: dict = CPU_DECODING, **kwargs) -> Callable:
  """`jax.jit` with XLA:CPU compiler options (on the CPU backend only; measured above): decoding
  programs (prefill + search) by default."""
  if jax.default_backend() == "cpu":
    kwargs.setdefault("compiler_options", cpu_options)
  return jax.jit(fn, **kwargs)
