"""What every command line shares: bad input is one line on stderr and exit status 2, checked before
any weights load or any file is written; a failure during the work is one line and exit status 1; a
Python traceback only with `--debug`.

    def main(argv=None) -> int:
      return options.run(_main, argv)

    def _main(argv):
      a = options.Parser(prog="python -m blip2_jax.x").parse_args(argv)   # adds --debug
      options.check_output(a.output)                                      # before any work
      a.model = options.model_dir(a.model, revision=a.revision)           # a Hub id -> its cached snapshot
      options.check_checkpoint(a.model, archs=options.GENERATION_ARCHS, task="captioning")
      ...                                                                 # raise UsageError(...) for bad input

Exit statuses: 0 done, 1 the work failed (or, where a tool says so, finished with skipped inputs),
2 bad input (flags, files, the checkpoint directory), 130 interrupted.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import traceback

import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections import config_flags

from blip2_jax.checkpoints import hf, io
from blip2_jax.core import hub
from blip2_jax.core.errors import Failure, UsageError  # noqa: F401 - the commands raise options.UsageError
from blip2_jax.data import annotations, processing
from blip2_jax.models import blip2, registry

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

BLIP2_MODEL_TYPES = ("blip-2", "instructblip")
GENERATION_ARCHS = ("Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration")
RETRIEVAL_ARCH = "Blip2ForImageTextRetrieval"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
QFORMER_HEAD_FILE = "qformer_lm_head.safetensors"  # stage-1 extras beside the weights, not the weights


# ----------------------------------------------------------------------------------------
# running a command


class _StoreOnce(argparse._StoreAction):
  """argparse's "store", refusing a second value: a flag given twice would otherwise silently keep the last."""

  def __call__(self, parser, namespace, values, option_string=None):
    given = parser.__dict__.setdefault("_given", {})  # reset by Parser.parse_known_args
    if self.dest in given:
      first, flag = given[self.dest]
      raise UsageError(f"{option_string} given twice ({flag} {first}, then {option_string} {values}): give it once")
    given[self.dest] = (values, option_string)
    super().__call__(parser, namespace, values, option_string)


class Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are UsageErrors (one line, exit 2, no usage dump), which has --debug
  and which refuses a single-valued flag given twice (`action="append"` flags take several)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.register("action", None, _StoreOnce)  # argument groups share these registries
    self.register("action", "store", _StoreOnce)
    self.add_argument("--debug", action="store_true", help="show the Python traceback of an error")

  def parse_known_args(self, args=None, namespace=None):
    self._given = {}  # flags seen in this parse (_StoreOnce)
    return super().parse_known_args(args, namespace)

  def error(self, message):
    raise UsageError(f"{message} (see {self.prog} --help)")


def refuse_repeated_flags(argv, multi=()) -> None:
  """UsageError for a flag given twice in `argv`, for the absl commands (train, aot; `Parser` does the same
  for the others): absl keeps the last value silently. Dashes and underscores are one spelling
  (--global-batch is --global_batch); a --config.KEY override counts per KEY; `multi` names flags that
  may repeat."""
  seen: dict[str, str] = {}
  for i, a in enumerate(argv):
    if a == "--":
      break
    if not re.match(r"--?[A-Za-z]", a):  # a value, also a negative one (--mesh -1,8,1)
      continue
    name = a.lstrip("-").split("=", 1)[0].replace("-", "_")
    if name.startswith("no") and name[2:] in seen:  # absl's --nodebug after --debug
      name = name[2:]
    if name in multi:
      continue
    given = a if "=" in a or i + 1 == len(argv) or argv[i + 1].startswith("-") else f"{a} {argv[i + 1]}"
    if name in seen:
      raise UsageError(f"--{name} given twice ({seen[name]}, then {given}): give it once")
    seen[name] = given


def run(main, argv=None) -> int:
  """`main(argv)` -> its exit status; UsageError -> "error: ..." and 2, any other exception -> one line
  and 1 (or the exception's own `exit_status`, e.g. 143 for a training run preempted by SIGTERM, 2 for
  a resume under another config), Ctrl-C -> 130. The traceback is printed only when argv holds --debug."""
  argv = sys.argv[1:] if argv is None else list(argv)
  debug = "--debug" in argv
  try:
    return main(argv)
  except UsageError as e:
    return _report(f"error: {e}", EXIT_USAGE, debug)
  except KeyboardInterrupt as e:  # a message, if any, says what was saved (training)
    return _report(str(e) or "interrupted", EXIT_INTERRUPTED, debug)
  except Exception as e:  # noqa: BLE001 - every failure becomes one line (the traceback with --debug)
    status = getattr(e, "exit_status", EXIT_FAILED)
    if status != EXIT_FAILED:  # a stop the exception itself describes (its message is the whole story)
      return _report(f"{'error: ' if status == EXIT_USAGE else ''}{e}", status, debug)
    hint = "" if debug or _ours(e) else " (--debug shows the traceback)"
    return _report(f"error: {describe(e)}{hint}", EXIT_FAILED, debug)


def _report(line: str, code: int, debug: bool) -> int:
  if debug:
    traceback.print_exc()
  sys.stdout.flush()
  print(line, file=sys.stderr, flush=True)
  return code


def _ours(e: BaseException) -> bool:
  """An error blip2_jax raises on purpose, whose message is the whole story (CheckpointError, ImageLoadError, ...)."""
  return type(e).__module__.startswith("blip2_jax")


def describe(e: BaseException) -> str:
  """The message of our own errors as it is; other exceptions with their type (a bare "3" says nothing)."""
  return str(e) if _ours(e) else f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------
# optional packages


def missing_packages(modules) -> list[str]:
  """The modules of `modules` that cannot be imported, found without importing them (find_spec; a
  module set to None in sys.modules counts as missing, as `import` refuses it)."""
  out = []
  for m in modules:
    try:
      found = importlib.util.find_spec(m) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
      found = False
    if not found:
      out.append(m)
  return out


def require_packages(packages: dict[str, str], what: str, install: str) -> None:
  """UsageError naming the missing ones and the command that installs them, unless every module of
  `packages` ({module: its name on PyPI}) can be imported. Commands call it before any work, so a run
  never stops on a missing package after its results were computed."""
  missing = missing_packages(packages)
  if missing:
    names = ", ".join(packages[m] for m in missing)
    raise UsageError(f"{what} needs {names}, which {'is' if len(missing) == 1 else 'are'} not installed: {install}")


# ----------------------------------------------------------------------------------------
# argparse types


def _int(text: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1."""
  v = _int(text)
  if v < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
  return v


def nonnegative_int(text: str) -> int:
  """argparse type: an integer >= 0."""
  v = _int(text)
  if v < 0:
    raise argparse.ArgumentTypeError(f"must be at least 0, got {v}")
  return v


def finite_float(text: str) -> float:
  """argparse type: a finite number (float() also takes "nan" and "inf", which would make every score NaN)."""
  try:
    v = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not math.isfinite(v):
    raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
  return v


def nonnegative_float(text: str) -> float:
  """argparse type: a finite number >= 0."""
  try:
    v = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not 0 <= v < float("inf"):
    raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
  return v


# ----------------------------------------------------------------------------------------
# config overrides


def override_items(argv: list[str], prefix: str = "--config.") -> tuple[list[str], list[str]]:
  """Splits `--config.KEY=VALUE` (or `--config.KEY VALUE`) arguments out of argv -> (["KEY=VALUE", ...],
  the other arguments)."""
  items, rest, i = [], [], 0
  while i < len(argv):
    a = argv[i]
    if a.startswith(prefix):
      if "=" in a:
        items.append(a[len(prefix):])
      elif i + 1 < len(argv):
        items.append(f"{a[len(prefix):]}={argv[i + 1]}")
        i += 1
      else:
        raise UsageError(f"{a}: expected {a}=VALUE")
    else:
      rest.append(a)
    i += 1
  return items, rest


def apply_overrides(config, items, *, flag: str) -> set[str]:
  """KEY=VALUE overrides (dotted keys) applied to the ConfigDict `config` in place; returns the keys set.
  The one override path of the command lines (train's --config.KEY=VALUE, flag "--config."; finetune's
  --set KEY=VALUE, flag "--set "): each value is parsed as its field's type by ml_collections, as its
  config flags do (ints, floats, booleans, strings; a tuple as "1,8,1", "(1, 8, 1)" or "" for none). A key the config
  lacks, a group, or a value of the wrong type is a UsageError naming the override."""
  items = [str(i) for i in items]
  keys, texts, done = [], [], set()
  for item in items:
    key, eq, text = item.partition("=")
    if not eq or not key.strip():
      raise UsageError(f"{flag}{item}: expected KEY=VALUE, e.g. {flag}optim.lr=3e-5")
    current = _check_key(config, key.strip(), f"{flag}{item}")
    if isinstance(current, list):  # ml_collections overrides tuples, not lists: set it here
      _set(config, key.strip(), list(_parse_literal(_as_literal(text), f"{flag}{item}")))
      done.add(key.strip())
      continue
    keys.append(key.strip())
    texts.append(_as_literal(text) if isinstance(current, tuple) else text)
  if not keys:
    return done
  values = flags.FlagValues()
  argv = ["overrides"] + [f"--config.{k}={t}" for k, t in zip(keys, texts)]
  saved, sys.argv = sys.argv, argv  # ml_collections defines a flag per override it sees in sys.argv
  try:
    config_flags.DEFINE_config_dict("config", config, flag_values=values, lock_config=False)
    values(argv)
  except flags.Error as e:  # "flag --config.KEY=VALUE: problem"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    bad = re.match(r"flag --config\.([^=]+)=(.*?): (.*)", text)
    if not bad:
      raise UsageError(f"{flag}: {text}") from None
    problem = next((say for marker, say in _VALUE_PROBLEMS if marker in bad.group(3)), bad.group(3))
    raise UsageError(f"{flag}{bad.group(1)}={bad.group(2)}: {problem}") from None
  finally:
    sys.argv = saved
  new = values["config"].value
  if new is not config:  # ml_collections may hand back a copy
    for k in keys:
      _set(config, k, _get(new, k))
  return done | set(keys)


def _get(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def _set(config, key: str, value) -> None:
  *parents, last = key.split(".")
  for part in parents:
    config = config[part]
  config[last] = value


def _parse_literal(text: str, where: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise UsageError(f"{where}: expected a comma-separated list") from None


# ml_collections' messages for a value of the wrong type, said plainly
_VALUE_PROBLEMS = (("invalid literal for int()", "expected an integer"),
                   ("could not convert string to float", "expected a number"),
                   ("Non-boolean argument", "expected true or false"))


def _as_literal(text: str) -> str:
  """A comma-separated list ("a/.*,b/.*", "1,8,1", "" for none) as the tuple literal ml_collections parses."""
  if text.strip().startswith(("(", "[")):
    return text
  parts = [t.strip() for t in text.split(",") if t.strip()]
  return repr(tuple(int(t) if re.fullmatch(r"-?\d+", t) else t for t in parts))


def _check_key(config, key: str, where: str):
  """The field's current value; UsageError for a key the config lacks or a group."""
  node, parts = config, key.split(".")
  for i, part in enumerate(parts):
    here = ".".join(parts[:i + 1])
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      prefix = ".".join(parts[:i])
      known = [f"{prefix}.{k}" if prefix else k for k in sorted(node.keys())] \
          if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(here, known, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else f"; known here: {', '.join(known)}"
      raise UsageError(f"{where}: the config has no field {here!r}{hint}")
    node = node[part]
  if isinstance(node, ml_collections.ConfigDict):
    raise UsageError(f"{where}: {key!r} is a group; set one of its fields: "
                     f"{', '.join(key + '.' + k for k in sorted(node.keys()))}")
  return node


# ----------------------------------------------------------------------------------------
# paths


def check_output(path: str | None, flag: str = "--output") -> None:
  """UsageError unless `path` can be written: not a directory, in an existing writable directory.
  Called before any work, so that no result is computed only to be lost."""
  if not path:
    return
  if os.path.isdir(path):
    raise UsageError(f"{flag} {path}: is a directory; give a file path")
  d = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(d):
    raise UsageError(f"{flag} {path}: directory {d} does not exist")
  if not os.access(d, os.W_OK | os.X_OK):
    raise UsageError(f"{flag} {path}: directory {d} is not writable")
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise UsageError(f"{flag} {path}: the file exists and is not writable")


def check_new_dir(path: str, flag: str) -> None:
  """UsageError unless `path` is a writable directory or can be created (its nearest existing
  ancestor is a writable directory). Nothing is created here; a URL (gs://...) is left to its filesystem."""
  if "://" in path:
    return
  p = os.path.abspath(path)
  if os.path.exists(p):
    if not os.path.isdir(p):
      raise UsageError(f"{flag} {path}: exists and is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
      raise UsageError(f"{flag} {path}: directory is not writable")
    return
  parent = os.path.dirname(p)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UsageError(f"{flag} {path}: cannot be created: {parent} is a file")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError(f"{flag} {path}: cannot be created: {parent} is not writable")


def remove_if_empty(path: str) -> None:
  """Removes a directory tree that holds no file: a run that failed before writing anything leaves nothing behind."""
  if os.path.isdir(path) and not any(files for _, _, files in os.walk(path)):
    shutil.rmtree(path, ignore_errors=True)


def check_input_file(path: str, flag: str) -> None:
  if not os.path.exists(path):
    raise UsageError(f"{flag} {path}: file not found")
  if not os.path.isfile(path):
    raise UsageError(f"{flag} {path}: not a file")
  if not os.access(path, os.R_OK):
    raise UsageError(f"{flag} {path}: file is not readable")


def check_input_dir(path: str, flag: str) -> None:
  if not os.path.exists(path):
    raise UsageError(f"{flag} {path}: directory not found")
  if not os.path.isdir(path):
    raise UsageError(f"{flag} {path}: not a directory")


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file in the same directory: a failure never leaves
  a half-written file under the final name."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ----------------------------------------------------------------------------------------
# checkpoint directories


def add_model_arg(p, help: str, flag: str = "--model", **kwargs) -> None:
  """`flag` (a checkpoint directory or a Hugging Face Hub id) and `--revision` for the Hub id."""
  p.add_argument(flag, help=f"{help}; or a Hugging Face Hub id such as Salesforce/blip2-opt-2.7b, read "
                 "from (or fetched into) the Hugging Face cache", **kwargs)
  p.add_argument("--revision", default=None,
                 help=f"with a Hub id as {flag}: its branch, tag or commit (default main)")


def model_dir(path: str, flag: str = "--model", revision: str | None = None) -> str:
  """The local directory of `path`: itself when it exists (a local path keeps precedence), else a Hub
  id's snapshot in the Hugging Face cache (fetched unless HF_HUB_OFFLINE is set). UsageError when a Hub id
  cannot be had (not cached while offline, unknown, gated); any other missing path is returned as given,
  for the checks below to report."""
  try:
    return hub.resolve(path, revision=revision)
  except hub.HubError as e:
    raise UsageError(f"{flag} {e}") from None


def read_checkpoint_config(path: str, flag: str = "--model") -> dict:
  """DIR/config.json of a BLIP-2 / InstructBLIP save_pretrained directory; UsageError naming the problem
  (missing, not a directory, empty, no or unreadable config.json, another model type)."""
  if not os.path.exists(path):
    raise UsageError(f"{flag} {path}: no such directory")
  if not os.path.isdir(path):
    raise UsageError(f"{flag} {path}: not a directory (expected a save_pretrained checkpoint directory)")
  if not os.listdir(path):
    raise UsageError(f"{flag} {path}: the directory is empty (expected a save_pretrained checkpoint directory)")
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise UsageError(f"{flag} {path}: no config.json (expected a save_pretrained directory of a BLIP-2 / "
                     "InstructBLIP model)")
  try:
    with open(cfg_path, encoding="utf-8") as f:
      cfg = json.load(f)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise UsageError(f"{flag} {path}: config.json is not readable JSON ({e})") from None
  if not isinstance(cfg, dict):
    raise UsageError(f"{flag} {path}: config.json holds a JSON {type(cfg).__name__}, not an object")
  mt = cfg.get("model_type")
  if mt not in BLIP2_MODEL_TYPES:
    archs = ", ".join(map(str, cfg.get("architectures") or [])) or "no architectures"
    raise UsageError(f"{flag} {path}: config.json describes a {mt!r} model ({archs}), not a BLIP-2 / "
                     "InstructBLIP checkpoint")
  return cfg


def architecture(cfg: dict) -> str | None:
  """`architectures[0]` of a config.json dict (an InstructBLIP config without it can only generate)."""
  archs = cfg.get("architectures") or []
  if archs:
    return str(archs[0])
  return GENERATION_ARCHS[1] if cfg.get("model_type") == "instructblip" else None


TORCH_INSTALL = "pip install torch==2.13.0 (the CPU wheel the test extras pin; an unpinned torch pulls a CUDA build)"


def check_weights(path: str, flag: str = "--model") -> None:
  """UsageError when DIR has no weights file, or a safetensors file whose header does not fit its
  size (truncated), or an index naming missing shards, or only pytorch_model.bin without torch to read
  it. Reads the headers only."""
  files = [f for f in os.listdir(path) if f != QFORMER_HEAD_FILE]
  if any(f.endswith(".safetensors") or f == WEIGHT_FILES[1] for f in files):
    try:
      io.SafetensorsReader(path)
    except io.CheckpointError as e:
      raise UsageError(f"{flag} {path}: {e}") from None
  elif WEIGHT_FILES[2] not in files:
    raise UsageError(f"{flag} {path}: no weights file ({', '.join(WEIGHT_FILES)})")
  else:
    require_packages({"torch": "torch"}, f"{flag} {path} (only {WEIGHT_FILES[2]}, a torch pickle)", TORCH_INSTALL)


def check_checkpoint(path: str, *, flag: str = "--model", archs=None, task: str = "this command") -> dict:
  """Everything about a checkpoint directory that can be checked without loading it -> its config.json.

  `archs`: the architectures the command takes (None: any BLIP-2 class); another one is refused
  naming both."""
  cfg = read_checkpoint_config(path, flag)
  arch = architecture(cfg)
  if archs is not None and arch is not None and arch not in archs:
    if tuple(archs) == GENERATION_ARCHS:
      raise UsageError(f"{flag} {path} is a {arch} checkpoint, which has no language model; {task} needs a "
                       f"{' or '.join(archs)} checkpoint (e.g. Salesforce/blip2-opt-2.7b)")
    raise UsageError(f"{flag} {path} is a {arch} checkpoint; {task} needs a {' or '.join(archs)} one"
                     + (" (e.g. Salesforce/blip2-itm-vit-g)" if RETRIEVAL_ARCH in archs else ""))
  check_weights(path, flag)
  return cfg


def load_tokenizer(path: str, flag: str = "--model"):
  """processing.load_tokenizer with a missing tokenizer as a UsageError (load it before the weights)."""
  try:
    return processing.load_tokenizer(path)
  except (FileNotFoundError, OSError, ValueError) as e:
    raise UsageError(f"{flag}: {e}") from None


def check_tokenizer(path: str, flag: str = "--model") -> None:
  """UsageError when `path` holds no tokenizer files (cheap: nothing is loaded)."""
  if not os.path.isdir(path) or not any(os.path.isfile(os.path.join(path, f)) for f in processing._TOKENIZER_FILES):
    raise UsageError(f"{flag}: {path} holds no tokenizer files (looked for {', '.join(processing._TOKENIZER_FILES)}); "
                     "save the tokenizer with the checkpoint (tokenizer.save_pretrained(dir))")


def load_image_processor(path: str, flag: str = "--model"):
  """processing.ImageProcessor.from_pretrained with unreadable settings as a UsageError (load it before the weights)."""
  try:
    return processing.ImageProcessor.from_pretrained(path)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UsageError(f"{flag} {path}: cannot read its image processor settings: {e}") from None


# ----------------------------------------------------------------------------------------
# images and generation flags (caption, vqa, retrieve, evaluate)


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_images(images_dir: str) -> list[str]:
  """The files with an image extension in `images_dir`, sorted (not recursive); UsageError when there are none."""
  check_input_dir(images_dir, "--images-dir")
  files = sorted(os.path.join(images_dir, f) for f in os.listdir(images_dir)
                 if f.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(images_dir, f)))
  if not files:
    raise UsageError(f"--images-dir {images_dir}: holds no images ({', '.join(IMAGE_EXTS)})")
  return files


def image_inputs(files, images_dir) -> tuple[list[str], list[str]]:
  """(paths, names) of IMAGE arguments and of the images in --images-dir; UsageError when a file is
  missing or there is no image at all."""
  paths, names = [], []
  for f in files:
    if not os.path.isfile(f):
      raise UsageError(f"image file not found: {f}" if not os.path.exists(f) else f"image {f}: not a file")
    paths.append(f)
    names.append(f)
  if images_dir:
    for f in list_images(images_dir):
      paths.append(f)
      names.append(os.path.relpath(f, images_dir))
  if not paths:
    raise UsageError("no images: give IMAGE files and/or --images-dir")
  return paths, names


def report_skipped(errors, names) -> None:
  """Lists the images that could not be read (after the results)."""
  print(f"skipped {len(errors)} unreadable image(s):", file=sys.stderr)
  for i, msg in errors:
    print(f"  {names[i]}: {msg}", file=sys.stderr)


def model_config(path: str, flag: str = "--model") -> blip2.Blip2Config:
  """The checkpoint's Blip2Config from its config.json alone (no weights): what the checks made before
  the weights load read (positions, query count, family)."""
  try:
    return blip2.Blip2Config.from_hf(hf.read_hf_config(path))
  except (OSError, ValueError, TypeError) as e:
    raise UsageError(f"{flag} {path}: config.json: {e}") from None


def load_generation_checkpoint(model_dir: str, dtype: str = "float32", task: str = "captioning", check=None):
  """-> (model, params, tokenizer, qformer_tokenizer or None, ImageProcessor). The directory, its
  tokenizers and its image processor are checked before the weights load (UsageError naming the
  problem), and so is `check(config, tokenizer, qformer_tokenizer)` when given (e.g.
  `inference.check_generation`: options and positions; its ValueError becomes a UsageError)."""
  cfg = check_checkpoint(model_dir, archs=GENERATION_ARCHS, task=task)
  tok = load_tokenizer(model_dir)
  qtok = None
  if cfg.get("model_type") == "instructblip":
    qtok = load_tokenizer(os.path.join(model_dir, "qformer_tokenizer"))
  proc = load_image_processor(model_dir)
  if check is not None:
    try:
      check(model_config(model_dir), tok, qtok)
    except ValueError as e:
      raise UsageError(str(e)) from None
  model, params = hf.from_pretrained(model_dir, dtype=jnp.dtype(dtype))
  if not registry.can(model, registry.LM):  # config.json named no architecture
    raise UsageError(f"--model {model_dir} is a {model.config.architecture} checkpoint, which has no language "
                     f"model; {task} needs a {' or '.join(GENERATION_ARCHS)} checkpoint")
  return model, params, tok, qtok, proc


def add_generation_args(p, defaults: dict) -> None:
  """Generation flags; left unset they take the task's LAVIS defaults for the checkpoint's family. A
  default --min-new-tokens above the --max-new-tokens given is lowered to it; a --min-new-tokens given
  above --max-new-tokens is refused (checked with the LLM's positions before the weights load)."""
  for flag, key, kind in (("--num-beams", "num_beams", positive_int),
                          ("--max-new-tokens", "max_new_tokens", positive_int),
                          ("--min-new-tokens", "min_new_tokens", nonnegative_int)):
    p.add_argument(flag, type=kind, default=None, help=f"default {defaults[key]} (LAVIS)")
  p.add_argument("--batch-size", type=positive_int, default=8,
                 help="images per compiled batch (default 8); the last batch is padded")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype of the ViT and the LLM (the Q-Former stays float32)")


def check_text_len(model_dir: str, n: int, flag: str = "--max-text-len") -> None:
  """UsageError when texts of `n` tokens do not fit the Q-Former's learned positions (before the weights load)."""
  limit = model_config(model_dir).qformer.max_position_embeddings
  if n > limit:
    raise UsageError(f"{flag} {n}: the Q-Former has {limit} positions (max_position_embeddings, learned); give at "
                     f"most {limit}")


def add_image_args(p, annotations_dir: bool = False) -> None:
  """--max-image-pixels, and with annotation files naming images under --images-dir,
  --allow-outside-images-dir."""
  p.add_argument("--max-image-pixels", type=nonnegative_int, default=None,
                 help=f"decode images up to this many pixels (default {processing.MAX_IMAGE_PIXELS_DEFAULT:,}, "
                      f"what Pillow decodes; 0: no limit; also ${processing.MAX_IMAGE_PIXELS_ENV}); larger ones "
                      "are refused as possible decompression bombs")
  if annotations_dir:
    p.add_argument(annotations.OUTSIDE_FLAG, action="store_true",
                   help="read annotation image paths that lead outside --images-dir (absolute, or up with ..); "
                        "refused by default")


def apply_image_args(a) -> None:
  """--max-image-pixels for this process and its data workers; UsageError for a bad
  $BLIP2_JAX_MAX_IMAGE_PIXELS."""
  if a.max_image_pixels is not None:
    processing.set_max_image_pixels(a.max_image_pixels)
  try:
    processing.max_image_pixels()
  except ValueError as e:
    raise UsageError(str(e)) from None


def generation_options(a) -> dict:
  """The generation flags the user set (the rest keep the library's per-task defaults)."""
  return {k: getattr(a, k) for k in ("num_beams", "max_new_tokens", "min_new_tokens") if getattr(a, k) is not None}
