"""The config a run was started with, kept in its workdir, and the check a resume makes against it.

A rerun with the same --workdir resumes from the latest checkpoint. Without this check it would
silently continue under whatever the new command says (another learning rate, batch size, step count)
or fail deep inside orbax when the new recipe's model has other shapes. So the first run writes
WORKDIR/config.json, and a resume whose config differs is refused with the keys that differ, unless
the caller allows them (`allow`: the command lines' --allow-config-change KEY[,KEY...]).

Free to change on a resume (they change how the run reports or how it is laid out over the devices,
not what it trains; resuming onto another mesh is supported): FREE_KEYS.
Not compared: SOURCE_KEYS, where the initial weights and tokenizers were read from (a resumed run
takes its weights from the checkpoint; a directory may move, and a Hub id resolves to a new snapshot
path when its repository moves on).
"""
from __future__ import annotations

import json
import os

FILE = "config.json"
MAX_SHOWN = 6  # differences named in the message; more mean another recipe
FREE_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_at_start", "eval",
             "export_hf", "data.worker_count", "peak_tflops", "mesh")
SOURCE_KEYS = ("model.pretrained", "model.vision", "model.qformer_bert", "model.language_model",
               "tokenizer.llm", "tokenizer.qformer")


class ConfigMismatch(ValueError):
  """A resume whose config differs from the run's; the message names the keys. Bad input: exit 2."""
  exit_status = 2


def flatten(d, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}; values as JSON has them (tuples as lists)."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(flatten(v, key + "."))
    else:
      out[key] = json.loads(json.dumps(v, default=str))
  return out


def _covered(key: str, keys) -> bool:
  return any(key == k or key.startswith(k + ".") for k in keys)


def differences(saved: dict, config: dict, allow=()) -> list[str]:
  """`key: old -> new` for every compared key that differs and is not allowed."""
  a, b = flatten(saved), flatten(config)
  skip = tuple(FREE_KEYS) + tuple(SOURCE_KEYS) + tuple(allow)
  out = []
  for key in sorted(set(a) | set(b), key=lambda k: (k != "task", k)):  # another task first: another recipe
    if _covered(key, skip) or a.get(key) == b.get(key):
      continue
    out.append(f"{key}: {_show(a.get(key, '(absent)'))} -> {_show(b.get(key, '(absent)'))}")
  return out


def _show(v) -> str:
  s = json.dumps(v) if not isinstance(v, str) else repr(v)
  return s if len(s) <= 60 else s[:57] + "..."


def _path(workdir: str):
  from etils import epath  # orbax's path layer: local directories and gs:// alike
  return epath.Path(workdir) / FILE


def read(workdir: str) -> dict | None:
  p = _path(workdir)
  return json.loads(p.read_text()) if p.exists() else None


def write(workdir: str, config) -> None:
  """WORKDIR/config.json, replaced atomically on a local disk."""
  p = _path(workdir)
  p.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps(config.to_dict(), indent=1, sort_keys=True, default=str)
  if "://" in str(p):
    p.write_text(text)
    return
  tmp = f"{p}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, p)


def has_checkpoint(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds a finished checkpoint (orbax names them by step; a save cut
  short leaves only a temporary directory), without starting orbax."""
  from etils import epath
  d = epath.Path(workdir) / "checkpoints"
  return d.exists() and any(p.name.isdigit() for p in d.iterdir())


def check_resume(workdir: str, config, allow=(), *, resuming: bool) -> None:
  """ConfigMismatch when `resuming` a run whose saved config differs from `config` in a key that is
  neither free nor allowed ("all" allows every key). A workdir without config.json (written by an
  older version) is not checked."""
  if not resuming:
    return
  saved = read(workdir)
  if saved is None:
    return
  allow = tuple(allow)
  if "all" in allow:
    return
  diff = differences(saved, config.to_dict(), allow)
  if not diff:
    return
  shown = "; ".join(diff[:MAX_SHOWN]) + (f"; and {len(diff) - MAX_SHOWN} more" if len(diff) > MAX_SHOWN else "")
  hint = "rerun with the same config or use a new --workdir"
  if len(diff) <= MAX_SHOWN:  # a few deliberate changes, not another recipe
    hint += ", or allow the change with --allow-config-change " + ",".join(d.split(":", 1)[0] for d in diff)
  raise ConfigMismatch(f"--workdir {workdir} holds a run started with another config ({shown}): {hint}")
