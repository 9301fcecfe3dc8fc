"""python -m blip2_jax.train --config configs/<recipe>.py[:args] --workdir DIR [--config.x.y=value ...]
(installed: blip2-train ...)

Runs (or resumes) a BLIP-2 training recipe; see blip2_jax/train/loop.py and configs/. --config is the
path of a recipe file, from any directory; the recipe's `from configs import common` reads the
configs/ it sits in (or, for a recipe file of your own, the installed recipes). Model directories
in the config (model.pretrained, model.vision, model.qformer_bert, model.language_model,
tokenizer.llm, tokenizer.qformer) may be Hugging Face Hub ids, resolved through the Hugging Face
cache before training starts.

Multi-host: start the same command on every host; `--distributed` (or a detected SLURM / TPU-pod /
coordinator environment) calls jax.distributed.initialize first, with --coordinator /
--num-processes / --process-id when the environment does not provide them. The flags with an
underscore (--max_steps, --num_processes, --process_id) are also accepted with a dash.

Bad input exits with status 2 and one line on stderr before anything is created: an unknown flag or
one given twice, a --config file that is missing or fails to load, a --config.KEY override of a field the recipe does not
have or of the wrong type, a value training would fail on (global_batch_size=0, num_epochs=0 without
total_steps, model.dtype=float8, ...), a --workdir that is a file or cannot be written, a Hub id that
cannot be had. A failure during training: one line and exit status 1 (`--debug` shows the traceback);
a --workdir this run created and left without a file is removed.
"""
from __future__ import annotations

import contextlib
import os
import sys

from absl import flags
from ml_collections import config_flags

from blip2_jax.cli import options
from blip2_jax.cli.options import UsageError
from blip2_jax.core import recipes, sharding
from blip2_jax.train import loop, run_config, validate

PROG = "python -m blip2_jax.train"
# Flags of their own (not absl's global FLAGS): another absl tool imported into the same process
# (the AOT compiler, tests) may define flags of the same names.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "a recipe: configs/<name>.py[:args]", flag_values=FLAGS,
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and the exported model go",
                               flag_values=FLAGS)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)",
                                 flag_values=FLAGS)
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0 (with --distributed)", flag_values=FLAGS)
_NPROC = flags.DEFINE_integer("num_processes", None, "number of processes (with --distributed; also "
                              "--num-processes)", lower_bound=1, flag_values=FLAGS)
_PID = flags.DEFINE_integer("process_id", None, "this process's index (with --distributed; also --process-id)",
                            lower_bound=0, flag_values=FLAGS)
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "stop after this many steps of this run (checkpointed; also "
                                  "--max-steps)", lower_bound=1, flag_values=FLAGS)
_ALLOW = flags.DEFINE_list("allow_config_change", [], "config keys a resume may change (e.g. total_steps,optim.lr; "
                           "'all' for any; also --allow-config-change): a resume under another config is refused "
                           "otherwise", flag_values=FLAGS)
_DEBUG = flags.DEFINE_bool("debug", False, "show the Python traceback of an error", flag_values=FLAGS)

ALIASES = {"--max-steps": "--max_steps", "--num-processes": "--num_processes", "--process-id": "--process_id",
           "--allow-config-change": "--allow_config_change"}
# Config fields that name a model or tokenizer directory (or a Hugging Face Hub id).
MODEL_DIR_KEYS = ("model.pretrained", "model.vision", "model.qformer_bert", "model.language_model", "tokenizer.llm",
                  "tokenizer.qformer")


def main(argv=None) -> int:
  return options.run(_main, argv)


def _main(argv) -> int:
  argv = [_alias(a) for a in argv]
  options.refuse_repeated_flags(argv)
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
    print(__doc__ + "\nflags:\n" + FLAGS.get_help())
    return 0
  config, overridden = parse(argv)
  validate.check_values(config, overridden=overridden, prefix="--config.")
  workdir = _WORKDIR.value
  options.check_new_dir(workdir, "--workdir")
  if _PID.value is not None and _NPROC.value is not None and _PID.value >= _NPROC.value:
    raise UsageError(f"--process_id {_PID.value}: must be below --num_processes {_NPROC.value}")
  run_config.check_resume(workdir, config, _ALLOW.value, resuming=run_config.has_checkpoint(workdir))
  resolve_model_dirs(config, overridden)

  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  created = not os.path.exists(workdir)
  try:
    sharding.initialize_distributed(_DISTRIBUTED.value, coordinator=_COORD.value, num_processes=_NPROC.value,
                                    process_id=_PID.value)
    loop.train(config, workdir, max_steps=_MAX_STEPS.value, allow_config_change=_ALLOW.value)
  except BaseException:
    if created:
      options.remove_if_empty(workdir)
    raise
  return 0


def _alias(arg: str) -> str:
  name, eq, value = arg.partition("=")
  return ALIASES.get(name, name) + eq + value


def parse(argv: list[str]):
  """Parses the flags and loads the recipe -> (config, the keys --config.KEY overrode); UsageError
  (one line) for a bad flag, a recipe that cannot be loaded or a bad override."""
  spec = _flag_value(argv, "--config")
  if not spec:
    raise UsageError(f"--config is required: a recipe file, configs/<name>.py[:args] (see {PROG} --help)")
  path = spec.split(":", 1)[0]
  options.check_input_file(path, "--config")
  recipes.prepare(spec)
  items, argv = options.override_items(argv)  # applied below, through the code finetune's --set uses
  _reset_flags()
  try:
    with _sys_argv([PROG] + argv):
      rest = FLAGS([PROG] + argv)
  except flags.Error as e:
    raise UsageError(_flag_error(e, spec)) from e
  except Exception as e:  # the recipe itself failed to import or run
    raise UsageError(f"--config {spec}: cannot load the recipe: {type(e).__name__}: {_last_line(str(e))}") from e
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(rest[1:])} (flags are --name=value; see {PROG} --help)")
  if not _WORKDIR.value:
    raise UsageError(f"--workdir is required (see {PROG} --help)")
  config = _CONFIG.value
  return config, options.apply_overrides(config, items, flag="--config.")


def resolve_model_dirs(config, overridden=()) -> None:
  """Replaces each Hugging Face Hub id among MODEL_DIR_KEYS by its local snapshot directory (UsageError
  when one cannot be had), so that nothing is fetched after the workdir exists."""
  for key in MODEL_DIR_KEYS:
    value = validate.get(config, key, "")
    if isinstance(value, str) and value:
      flag = f"--config.{key}" if key in overridden else f"config {key}"
      *parents, last = key.split(".")
      node = config
      for p in parents:
        node = node[p]
      node[last] = options.model_dir(value, flag)


def _reset_flags() -> None:
  """A second run in one process starts from the defaults, without the previous run's override flags
  (ml_collections defines a flag per --config.KEY while parsing)."""
  for name in [n for n in FLAGS if n.startswith("config.")]:
    delattr(FLAGS, name)
  FLAGS.unparse_flags()


def _flag_value(argv: list[str], flag: str) -> str | None:
  value = None
  for i, a in enumerate(argv):
    if a.startswith(flag + "="):
      value = a.split("=", 1)[1]
    elif a == flag and i + 1 < len(argv):
      value = argv[i + 1]
  return value


@contextlib.contextmanager
def _sys_argv(argv):
  saved = sys.argv
  sys.argv = list(argv)
  try:
    yield
  finally:
    sys.argv = saved


def _last_line(text: str) -> str:
  lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
  return lines[-1] if lines else ""


def _flag_error(e: flags.Error, spec: str) -> str:
  """absl's message in one line; a recipe's own error (get_config raising) without the traceback around it."""
  text = str(e)
  if "Traceback" in text:  # ml_collections folds the recipe's traceback into the message
    last = _last_line(text)
    return f"--config {spec}: {last.split(': ', 1)[1] if ': ' in last else last}"
  first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
  if first.startswith("flag --"):  # "flag --max_steps=0: 0 is not a valid value" -> "--max_steps=0: ..."
    first = first[len("flag "):]
  return f"{first} (see {PROG} --help)"


if __name__ == "__main__":
  sys.exit(main())
