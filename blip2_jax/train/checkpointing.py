"""Checkpoints of a training run and the stops that save one.

Orbax CheckpointManager under WORKDIR/checkpoints: the train state (params, optimizer state, step)
and the data iterator's state, saved together; orbax writes to a temporary directory and renames it
when complete, and keeps the last `keep`, so a crash mid-save never loses the previous checkpoint.
SIGTERM (a preemption) is caught as a flag the loop checks after each step (`Interrupt`), so it saves
and stops with `Preempted`; a second Ctrl-C during the final save is ignored.
"""
from __future__ import annotations

import logging
import os
import signal

import jax


def is_remote(path: str) -> bool:
  """gs://, s3://, ... (written by orbax through its filesystem layer, not by os)."""
  return "://" in str(path)


_MIN_SLICE_BYTES = 1 << 20
_registered = []


def _small_arrays_unsliced(ocp) -> None:
  """Orbax's replica-parallel save slices every replicated array into one piece per replica, one
  dispatched op each: for the hundreds of biases and norm scales of a model (and their Adam
  moments) that costs seconds per save and buys nothing. Arrays whose per-replica piece is under
  1 MiB are written whole by one replica instead; large ones stay replica-parallel."""
  if _registered:
    return
  absl_log = logging.getLogger("absl")  # orbax warns that the override is an override, on every run
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=_MIN_SLICE_BYTES),
        override=True)
  finally:
    absl_log.setLevel(level)
  _registered.append(True)


class Checkpoints:
  """Orbax CheckpointManager over {state, data}: atomic saves, the last `keep` kept."""

  def __init__(self, directory: str, keep: int):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    _small_arrays_unsliced(ocp)
    self.directory = directory if is_remote(directory) else os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True),
        item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> None:
    ocp = self._ocp
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, abstract_state):
    ocp = self._ocp
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


class Interrupt:
  """SIGTERM (preemption) -> a flag the loop checks after each step, so it saves and stops.
  `ignore_sigint`: Ctrl-C is ignored too (while the final checkpoint is written)."""

  def __init__(self, ignore_sigint: bool = False):
    self.requested = False
    self._signals = (signal.SIGTERM, signal.SIGINT) if ignore_sigint else (signal.SIGTERM,)
    self._old = {}

  def __enter__(self):
    for sig in self._signals:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, sig, _frame):
    self.requested = self.requested or sig == signal.SIGTERM

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class Preempted(Exception):
  """SIGTERM stopped the run after its checkpoint was saved; rerunning the same command resumes it.
  The command lines exit with 143 (128 + SIGTERM, what a shell reports for a process the signal
  killed), so a scheduler tells a preempted run from a finished one."""
  exit_status = 143
