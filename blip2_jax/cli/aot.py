"""python -m blip2_jax.aot --config configs/<recipe>.py[:args] --topology v5p-128 [--mesh D,F,T]
       [--global-batch N] [--json out.json] [--hlo out.hlo] [--config.x.y=value ...]
python -m blip2_jax.aot --config ... --topology gpu [--chip h100] [--run 3]   # this host's GPU(s)

Compiles the recipe's train step for a TPU slice on this host (needs `pip install libtpu`; no TPU,
no weights, no data), or with `--topology gpu` / `local` for the devices attached here, and prints
memory per device against the chip's HBM, FLOPs, collectives, HBM traffic, replicated arrays and a
roofline step time / MFU / days; `--run N` also times N steps on random weights and data there.
Exit status: 0 it fits, 1 it does not fit in HBM (one line with the numbers) or compiling failed,
2 bad input (one line naming it: a flag given twice, a libtpu that is not the version this jax was
released with, checked before compiling); --debug shows tracebacks and libtpu's / XLA's own log.
"""
from __future__ import annotations

import json
import os
import re
import sys


def _local_requested(argv) -> bool:
  for i, a in enumerate(argv):
    if a.startswith("--topology="):
      value = a.split("=", 1)[1]
    elif a == "--topology" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    if value.strip().lower() in ("gpu", "local"):
      return True
  return False


# A TPU slice is compiled for, not attached: JAX's own backend stays the CPU and libtpu serves as a
# compiler only. --topology gpu / local compiles for the attached devices, so leaves JAX its default.
if not _local_requested(sys.argv):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from blip2_jax.cli import options  # noqa: E402
from blip2_jax.train import aot

_CONFIG = config_flags.DEFINE_config_file("config", None, "a recipe: configs/<name>.py[:args]", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: v5p-128, v5e-256 (v5litepod-256), v4-64, v6e-256, "
                                "or libtpu's notation (v5p:4x4x4); gpu / local: this host's devices")
_CHIP = flags.DEFINE_string("chip", None, "with --topology gpu / local: the chip figures to use (h100, h200, a100, "
                            "v5p, ...); default: from the devices' kind")
_MESH = flags.DEFINE_string("mesh", None, "data,fsdp,tensor (one -1 takes the rest); default: the recipe's")
_BATCH = flags.DEFINE_integer("global_batch", None, "global batch size (also --global-batch); default: the recipe's")
_JSON = flags.DEFINE_string("json", None, "also write the full report (every collective) as JSON here")
_HLO = flags.DEFINE_string("hlo", None, "also write the compiled (optimized, per-device) HLO text here")
_TOP = flags.DEFINE_integer("top", 12, "collective groups to print")
_RUN = flags.DEFINE_integer("run", 0, "with --topology gpu / local: also run this many steps on random weights and "
                            "data and print the measured step time beside the estimate")
_DEBUG = flags.DEFINE_bool("debug", False, "tracebacks, and libtpu's / XLA's own log on stderr")


def _first_line(e: BaseException) -> str:
  msg = str(e).strip() or type(e).__name__
  return msg.splitlines()[0]


def _config_error(e: BaseException) -> str:
  """One line for a recipe that does not load: the innermost message (the recipe's own error, the
  missing file), not ml_collections' wrapper and traceback."""
  lines = [x.strip() for x in str(e).splitlines() if x.strip()]
  last = lines[-1] if lines else type(e).__name__
  if isinstance(e, KeyError) or re.fullmatch(r"""["']+[\w.]+["']+""", last):  # an unknown --config.x.y
    return f"--config: the recipe has no field {last.strip(chr(34))} (check the --config.* overrides)"
  return f"--config: {last}"


def _parse(argv: list[str]) -> None:
  try:
    flags.FLAGS(argv)
    config = _CONFIG.value
    if config is not None:
      config.task  # a recipe that failed to load raises on first use  # noqa: B018
  except flags.UnrecognizedFlagError as e:
    raise options.UsageError(_first_line(e)) from e
  except Exception as e:  # noqa: BLE001 - a recipe's get_config raising, a missing file, a bad override
    raise options.UsageError(_config_error(e)) from e
  if config is None:
    raise options.UsageError("--config is required (configs/<recipe>.py[:args])")
  if not _TOPOLOGY.value:
    raise options.UsageError("--topology is required (e.g. v5p-128)")
  for path, flag in ((_JSON.value, "--json"), (_HLO.value, "--hlo")):
    options.check_output(path, flag)


def _apply(config) -> None:
  """--mesh and --global-batch onto the recipe."""
  with config.unlocked():
    if _MESH.value:
      try:
        mesh = tuple(int(x) for x in _MESH.value.split(","))
      except ValueError:
        mesh = ()
      if len(mesh) != 3:
        raise options.UsageError(f"--mesh {_MESH.value!r}: expected three integers data,fsdp,tensor")
      config.mesh = mesh
    if _BATCH.value is not None:
      if _BATCH.value < 1:
        raise options.UsageError(f"--global-batch {_BATCH.value}: expected a positive integer")
      config.global_batch_size = int(_BATCH.value)


def _recipe_name(argv) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def _help() -> str:
  return __doc__ + "\nflags:\n" + flags.FLAGS.module_help(sys.modules[__name__])


def _main(argv: list[str]) -> int:
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):  # absl's own --help lives in absl.app
    print(_help())
    return 0
  # --global-batch as well as absl's --global_batch
  argv = [("--global_batch" + a[len("--global-batch"):]) if a.startswith("--global-batch") else a for a in argv]
  options.refuse_repeated_flags(argv)
  sys.path.insert(0, os.getcwd())  # `configs.common` imports resolve from the repository root
  _parse(["blip2_jax.aot"] + argv)

  config = _CONFIG.value
  recipe_batch = int(config.global_batch_size)
  _apply(config)
  log: list = []
  try:
    report = aot.compile_recipe(config, _TOPOLOGY.value, recipe=_recipe_name(argv), recipe_batch=recipe_batch,
                                log=log, hlo_path=_HLO.value, chip=_CHIP.value, run=_RUN.value)
  except aot.DoesNotFit as e:
    raise options.Failure(f"{_recipe_name(argv)} does not fit {_TOPOLOGY.value}: XLA ran out of HBM ({e}); "
                          + aot.FIT_HINT) from e
  except (ValueError, KeyError) as e:  # the topology, the mesh, the batch split or the recipe's model
    raise options.UsageError(_first_line(e)) from e
  finally:
    if _DEBUG.value:
      sys.stderr.write("".join(log))
  print(aot.format_report(report, top=_TOP.value), flush=True)
  if _JSON.value:
    options.write_atomic(_JSON.value, json.dumps(report.to_dict(), indent=1, default=str))
  if not report.fits:
    raise options.Failure(aot.fit_message(report))
  return 0


def main(argv=None) -> int:
  return options.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
