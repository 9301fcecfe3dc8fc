"""What a training run reports: a line per `log_every` steps on stdout, a progress bar on stderr,
WORKDIR/metrics.jsonl and TensorBoard events (process 0 only), and the MFU from the step's matmul
FLOPs (counted on its jaxpr, blip2_jax.core.flops) against the device's peak."""
from __future__ import annotations

import json
import logging
import os
import sys

import jax

from blip2_jax.core import flops

log = logging.getLogger("blip2_jax.train")


# Dense bf16 peak FLOP/s per device, for the MFU estimate (config.peak_tflops overrides).
PEAK_TFLOPS = {"TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5p": 459, "TPU v5": 459, "TPU v6 lite": 918,
               "TPU v6e": 918, "H100": 989, "H200": 989, "H800": 989, "A100": 312, "A800": 312, "L4": 121,
               "B200": 2250}


def peak_flops(config) -> float | None:
  """Peak bf16 FLOP/s of one device (None when unknown, e.g. on CPU)."""
  if config.get("peak_tflops"):
    return float(config.peak_tflops) * 1e12
  kind = jax.devices()[0].device_kind
  for name, tf in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return tf * 1e12
  return None


def step_flops(jitted, *args) -> float | None:
  """Matmul FLOPs of one train step, counted on its jaxpr (`blip2_jax.core.flops`: scanned layers times
  their count, which XLA's cost analysis misses): what runs, so frozen towers count forward-only."""
  try:
    return flops.count_flops(jitted, *args) or None
  except Exception as e:  # best-effort; training goes on without MFU
    log.warning("no FLOP estimate: %s", e)
    return None


class Logger:
  """stdout lines + a progress bar (stderr) + metrics.jsonl + TensorBoard events, on process 0."""

  def __init__(self, workdir: str, total: int, start: int):
    self.on = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.bar = self.tb = None
    if not self.on:
      return
    try:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    except ImportError:
      pass
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:
      log.warning("tensorboardX is not installed: no TensorBoard events (pip install tensorboardX)")

  def print(self, msg: str):
    if self.on:
      (self.bar.write if self.bar is not None else print)(msg)
      sys.stdout.flush()

  def step(self, loss: float | None = None):
    if self.bar is not None:
      self.bar.update(1)
      if loss is not None:
        self.bar.set_postfix(loss=f"{loss:.4g}")

  def metrics(self, step: int, m: dict):
    if not self.on:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(dict(step=step, **m)) + "\n")
    if self.tb is not None:
      for k, v in m.items():
        if isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, step)
      self.tb.flush()

  def close(self):
    if self.bar is not None:
      self.bar.close()
    if self.tb is not None:
      self.tb.close()


def print0(msg: str) -> None:
  """print on process 0 only (a multi-host run says things once)."""
  if jax.process_index() == 0:
    print(msg, flush=True)
