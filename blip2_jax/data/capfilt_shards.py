"""CapFilt's output: one ArrayRecord shard and one manifest per input shard, written resumably.

    out = CapfiltOutput("/data/cc3m_capfilt")
    out.start(settings, shards, process_index=i)   # UsageError: another job's directory
    done = set(out.completed_shards())
    for shard in shards_for_process(shards, i, n):  # data/input_shards.py
      if shard.name in done:
        continue
      with out.write_shard(shard) as w:             # complete when the block ends without an error
        for sample in w.samples():                  # unusable samples are counted, not yielded
          ...                                       # decode (w.skip(sample, image_skip_reason(e))), caption, filter
          w.write(sample, captions, scores, origins)
      if w.damage:
        print(w.damage.describe(shard.name))

Directory layout:
  capfilt.json             the run record, written by process 0 before any shard: {"format", "version",
                           "job" (a fingerprint of settings + shards), "settings" (what decides the output:
                           inputs, captioner, filter, K, top k, seed, ...), "shards" (InputShard.describe())}
  NAME.array_record        the kept images of input shard NAME, in its sample order
  NAME.manifest.json       written last: its presence marks shard NAME complete
  *.partial                a file being written (a run killed there leaves it; the rerun removes it)
Files whose names start with "." (locks) are not looked at.

A record (data/sources.py's layout, `serialize_record`): the header
    {"key": the sample's key, "caption": [kept captions, best first],
     "capfilt": {"scores": [one per caption], "origins": ["web" | "synthetic", ...], "filter": settings["filter"]},
     ...the input's metadata: url, img2dataset_key, image_path, image_id, ...}
and the image file bytes as they were read (not re-encoded). `python -m blip2_jax.train` reads a
CapFilt directory as `data.source=array_record`, `data.array_record=DIR` (`array_record_paths`: its
complete shards that kept an image); the train pipeline draws one caption of the list per image per
step (data/pipeline.caption_text), as BLIP-2 did.

A manifest:
    {"shard": NAME, "job", "input": InputShard.describe(), "records": "NAME.array_record",
     "read": samples read, "kept": images written, "skipped": {reason: count},
     "skipped_keys": {reason: [its first 10 keys]}, "captions": {"web": n, "synthetic": m},
     "damage": null | {"samples", "offset", "record", "error"} (a truncated or corrupt input)}
with read == kept + sum(skipped.values()).

Resume: a shard is written to NAME.array_record.partial, renamed to NAME.array_record when complete,
then its manifest is written (through NAME.manifest.json.partial, renamed). A run killed at any
point leaves no manifest for an unfinished shard, so `completed_shards()` never lists it and a rerun
writes it again from scratch (removing what the killed run left), so the output holds every input
image exactly once. A damaged input (a truncated tar) makes a complete shard of what it held, its
manifest saying how far it got; after repairing the input, delete that manifest to read it again.
The same directory with another job (other settings or input shards) is refused, naming what
differs; so is a directory that holds other files or the inputs themselves.

Several processes: each writes only its own shards (`shards_for_process`); process 0 writes the run
record, the others compare against it when it is there. The records depend on the input shard
alone, never on the number of processes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from typing import Iterator, Mapping, Sequence

from blip2_jax.core.errors import UsageError
from blip2_jax.data import sources
from blip2_jax.data.input_shards import InputShard, Sample
from blip2_jax.data.webdataset import Damage

log = logging.getLogger("blip2_jax.data")

RUN_FILE = sources.CAPFILT_RUN_FILE
FORMAT, VERSION = "blip2_jax.capfilt", 1
RECORDS, MANIFEST, PARTIAL = ".array_record", ".manifest.json", ".partial"
ORIGINS = ("web", "synthetic")
NO_CAPTION_KEPT = "no caption kept"  # the filter passed no caption: the image is dropped
KEYS_PER_REASON = 10


def job_fingerprint(settings: Mapping, shards: Sequence[InputShard]) -> str:
  parts = [[s.name, s.format, s.start, s.stop] for s in shards]
  text = json.dumps({"settings": settings, "shards": parts}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _plain(obj):
  """A JSON round trip: tuples become lists, as they will be read back."""
  return json.loads(json.dumps(obj, sort_keys=True))


def _write_json(path: str, obj) -> None:
  """Through PATH.partial, flushed to disk and renamed: a reader sees the whole file or none."""
  tmp = path + PARTIAL
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def is_capfilt_dir(path) -> bool:
  return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(os.fspath(path), RUN_FILE))


class CapfiltOutput:
  """A CapFilt output directory (layout in the module docstring)."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = os.path.abspath(os.fspath(directory))
    self.job: str | None = None
    self.shard_names: list[str] | None = None
    self.filter = None

  def path(self, name: str, suffix: str) -> str:
    return os.path.join(self.directory, name + suffix)

  def run_record(self) -> dict | None:
    rec = _read_json(os.path.join(self.directory, RUN_FILE))
    return rec if isinstance(rec, dict) and rec.get("format") == FORMAT else None

  def start(self, settings: Mapping, shards: Sequence[InputShard], *, process_index: int = 0) -> None:
    """Opens the directory for this job (creating it), or resumes it when it holds the same job.
    UsageError (one line) for another job's directory, naming what differs, for a directory with
    other files, and for one that holds input files. Process 0 writes the run record."""
    settings = _plain(dict(settings))
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise UsageError(f"output {self.directory}: not a directory")
    inside = [s.path for s in shards if os.path.dirname(os.path.realpath(s.path)) == os.path.realpath(self.directory)]
    if inside:
      raise UsageError(f"output {self.directory} holds the input {inside[0]}; write the output elsewhere")
    self.job, self.shard_names = job_fingerprint(settings, shards), [s.name for s in shards]
    self.filter = settings.get("filter")
    record = {"format": FORMAT, "version": VERSION, "job": self.job, "settings": settings,
              "shards": [s.describe() for s in shards]}
    old = self.run_record()
    if old is not None:
      if old.get("job") != self.job:
        raise UsageError(f"output {self.directory} holds another CapFilt job ({_differences(old, record)}); "
                         "rerun that job's command to resume it, or choose another output directory")
      return
    if os.path.isdir(self.directory):
      foreign = sorted(f for f in os.listdir(self.directory) if not f.startswith(".") and not _ours(f))
      if foreign:
        raise UsageError(f"output {self.directory} is not empty ({foreign[0]}, ...) and holds no CapFilt run "
                         f"({RUN_FILE}); choose a new or empty directory")
    os.makedirs(self.directory, exist_ok=True)
    if process_index == 0:
      _write_json(os.path.join(self.directory, RUN_FILE), record)

  def _job(self) -> str | None:
    if self.job is None:
      rec = self.run_record()
      if rec is not None:
        self.job, self.shard_names = rec.get("job"), [s["name"] for s in rec.get("shards", [])]
    return self.job

  def manifest(self, name: str) -> dict | None:
    """Shard `name`'s manifest when the shard is complete (for this job), else None."""
    m = _read_json(self.path(name, MANIFEST))
    if not isinstance(m, dict) or m.get("job") != self._job() or not os.path.isfile(self.path(name, RECORDS)):
      return None
    return m

  def completed_shards(self) -> list[str]:
    """Names of the complete shards, in input order."""
    if self._job() is None:
      return []
    return [n for n in self.shard_names if self.manifest(n) is not None]

  def write_shard(self, shard: InputShard) -> ShardWriter:
    if self.job is None:
      raise RuntimeError("CapfiltOutput.start(...) first")
    return ShardWriter(self, shard)


def _ours(filename: str) -> bool:
  return filename == RUN_FILE or filename.endswith((RECORDS, MANIFEST, PARTIAL))


def _differences(old: dict, new: dict) -> str:
  out = []
  a, b = old.get("settings") or {}, new["settings"]
  for k in sorted(set(a) | set(b)):
    if a.get(k) != b.get(k):
      out.append(f"{k}: {_short(a.get(k))} there, {_short(b.get(k))} here")
  names_a, names_b = [s.get("name") for s in old.get("shards", [])], [s["name"] for s in new["shards"]]
  if names_a != names_b:
    first = next((i for i, (x, y) in enumerate(zip(names_a, names_b)) if x != y), min(len(names_a), len(names_b)))
    at = lambda names: _short(names[first]) if first < len(names) else "none"  # noqa: E731
    out.append(f"input shards: {len(names_a)} there, {len(names_b)} here, shard {first + 1} {at(names_a)} there, "
               f"{at(names_b)} here")
  elif not out:  # same settings and names: the shards' record ranges differ
    out.append("input shard ranges differ (another records per shard?)")
  return "; ".join(out[:3]) + ("; ..." if len(out) > 3 else "")


def _short(v) -> str:
  text = json.dumps(v, ensure_ascii=False)
  return text if len(text) <= 60 else text[:57] + "..."


class ShardWriter:
  """Writes one output shard; a context manager: complete (renamed, manifest written) when the block
  ends without an exception, removed when it raises."""

  def __init__(self, output: CapfiltOutput, shard: InputShard):
    self.output, self.shard = output, shard
    self.kept, self.skipped, self.skipped_keys = 0, {}, {}
    self.captions = dict.fromkeys(ORIGINS, 0)
    self.damage: Damage | None = None
    self._keys: set[str] = set()
    self._writer = None
    self._partial = output.path(shard.name, RECORDS + PARTIAL)

  def __enter__(self) -> ShardWriter:
    from array_record.python.array_record_module import ArrayRecordWriter
    for suffix in (MANIFEST, MANIFEST + PARTIAL, RECORDS, RECORDS + PARTIAL):  # what a killed run left
      p = self.output.path(self.shard.name, suffix)
      if os.path.exists(p):
        os.remove(p)
    self._writer = ArrayRecordWriter(self._partial, "group_size:1")  # group size 1: cheap random access
    return self

  def samples(self) -> Iterator[Sample]:
    """The shard's usable samples in order; those with an error are counted as skipped here. Sets
    `damage` once the shard is read (to the end, or to where it is damaged)."""
    stream = self.shard.samples()
    for s in stream:
      if s.error is not None:
        self.skip(s, s.error)
      else:
        yield s
    self.damage = stream.damage

  def skip(self, sample: Sample | str, reason: str) -> None:
    key = sample if isinstance(sample, str) else sample.key
    self._claim(key)
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    keys = self.skipped_keys.setdefault(reason, [])
    if len(keys) < KEYS_PER_REASON:
      keys.append(key)

  def write(self, sample: Sample, captions: Sequence[str], scores: Sequence[float], origins: Sequence[str]) -> None:
    """One image with its kept captions (best first), their filter scores and origins ("web" or
    "synthetic"); an image without a kept caption is counted as skipped ("no caption kept")."""
    captions, origins = list(captions), list(origins)
    scores = [float(x) for x in scores]
    if not (len(captions) == len(scores) == len(origins)):
      raise ValueError(f"{sample.key}: {len(captions)} captions, {len(scores)} scores, {len(origins)} origins")
    if any(o not in ORIGINS for o in origins) or any(not isinstance(c, str) for c in captions):
      raise ValueError(f"{sample.key}: origins must be {ORIGINS} and captions strings")
    if not all(math.isfinite(x) for x in scores):
      raise ValueError(f"{sample.key}: a filter score is not finite: {scores}")
    if not captions:
      self.skip(sample, NO_CAPTION_KEPT)
      return
    if sample.image is None:
      raise ValueError(f"{sample.key}: no image bytes to write")
    self._claim(sample.key)
    header = {**sample.meta, "key": sample.key, "caption": captions,
              "capfilt": {"scores": scores, "origins": origins, "filter": self.output.filter}}
    self._writer.write(sources.serialize_record(header, sample.image))
    self.kept += 1
    for o in origins:
      self.captions[o] += 1

  def _claim(self, key: str) -> None:
    if key in self._keys:
      raise ValueError(f"sample {key!r} of shard {self.shard.name} written twice")
    self._keys.add(key)

  def manifest(self) -> dict:
    return {"shard": self.shard.name, "job": self.output.job, "input": self.shard.describe(),
            "records": self.shard.name + RECORDS, "read": self.kept + sum(self.skipped.values()),
            "kept": self.kept, "skipped": dict(sorted(self.skipped.items())),
            "skipped_keys": dict(sorted(self.skipped_keys.items())), "captions": self.captions,
            "damage": vars(self.damage) if self.damage is not None else None}

  def __exit__(self, exc_type, exc, tb) -> None:
    self._writer.close()
    if exc_type is not None:
      os.remove(self._partial)
      return
    with open(self._partial, "rb") as f:
      os.fsync(f.fileno())
    os.replace(self._partial, self.output.path(self.shard.name, RECORDS))
    _write_json(self.output.path(self.shard.name, MANIFEST), self.manifest())
    fd = os.open(self.output.directory, os.O_RDONLY)
    try:
      os.fsync(fd)  # the renames themselves reach the disk
    finally:
      os.close(fd)


# ----------------------------------------------------------------------------------------
# reading


def _opened(directory) -> CapfiltOutput:
  """A CapFilt directory to read, its job and shard list taken from its run record."""
  out = CapfiltOutput(directory)
  if out._job() is None:
    raise FileNotFoundError(f"{out.directory} holds no CapFilt run ({RUN_FILE})")
  return out


def summary(directory: str | os.PathLike) -> dict:
  """The manifests of a CapFilt directory, totalled: {"shards", "complete", "incomplete" (names),
  "read", "kept", "skipped" {reason: n}, "captions" {"web", "synthetic"}, "damaged" [{"shard", ...}]}."""
  out = _opened(directory)
  total = {"shards": len(out.shard_names), "complete": 0, "incomplete": [], "read": 0, "kept": 0, "skipped": {},
           "captions": dict.fromkeys(ORIGINS, 0), "damaged": []}
  for name in out.shard_names:
    m = out.manifest(name)
    if m is None:
      total["incomplete"].append(name)
      continue
    total["complete"] += 1
    total["read"] += m["read"]
    total["kept"] += m["kept"]
    for k, v in m["skipped"].items():
      total["skipped"][k] = total["skipped"].get(k, 0) + v
    for k, v in m["captions"].items():
      total["captions"][k] = total["captions"].get(k, 0) + v
    if m.get("damage"):
      total["damaged"].append({"shard": name, **m["damage"]})
  total["skipped"] = dict(sorted(total["skipped"].items()))
  return total


def complete_shard_paths(directory: str | os.PathLike) -> list[str]:
  """The record files of a CapFilt directory's complete shards that kept an image, in input order;
  FileNotFoundError when there is none. Logs a warning when the run is not finished."""
  out = _opened(directory)
  done = [(n, out.manifest(n)) for n in out.completed_shards()]
  paths = [out.path(n, RECORDS) for n, m in done if m["kept"] > 0]
  if not paths:
    raise FileNotFoundError(f"CapFilt output {out.directory}: no complete shard with a kept image yet "
                            f"({len(done)} of {len(out.shard_names)} shards complete)")
  if len(done) < len(out.shard_names):
    log.warning("CapFilt output %s: reading the %d complete shards of %d (the run has not finished)",
                out.directory, len(done), len(out.shard_names))
  return paths


def array_record_paths(spec) -> list[str]:
  """`data.array_record` -> record files: a CapFilt output directory's complete shards, else
  `sources.shard_paths` (files, a directory of them, a convert prefix or a glob)."""
  if is_capfilt_dir(spec):
    return complete_shard_paths(spec)
  return sources.shard_paths(spec)
