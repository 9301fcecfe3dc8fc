"""python -m blip2_jax.train --config configs/<recipe>.py[:args] --workdir DIR [--config.x.y=value ...]

Runs (or resumes) a BLIP-2 training recipe; see blip2_jax/train/loop.py and configs/. Multi-host:
start the same command on every host; `--distributed` (or a detected SLURM / TPU-pod / coordinator
environment) calls jax.distributed.initialize first, with --coordinator / --num-processes /
--process-id when the environment does not provide them.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a recipe: configs/<name>.py[:args]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and the exported model go")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0 (with --distributed)")
_NPROC = flags.DEFINE_integer("num_processes", None, "number of processes (with --distributed)")
_PID = flags.DEFINE_integer("process_id", None, "this process's index (with --distributed)")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "stop after this many steps of this run (checkpointed)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  from blip2_jax import sharding
  sharding.initialize_distributed(_DISTRIBUTED.value, coordinator=_COORD.value, num_processes=_NPROC.value,
                                  process_id=_PID.value)
  from blip2_jax.train import loop
  loop.train(_CONFIG.value, _WORKDIR.value, max_steps=_MAX_STEPS.value)


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())  # `configs.common` imports resolve from the repository root
  app.run(main)
