"""Image-text data as users hold it, as a list of input shards with one interface (CapFilt's input).

    shards = list_input_shards(["/data/cc3m"], records_per_shard=10_000)
    for shard in shards_for_process(shards, jax.process_index(), jax.process_count()):
      stream = shard.samples()
      for s in stream:              # Sample(key, image bytes | None, web_texts, meta, error)
        ...
      if stream.damage:             # a truncated / corrupt shard: one line, then the next shard
        print(stream.damage.describe(shard.name))

Three formats (`inputs`: paths, directories or globs, in any mix):
  * webdataset: img2dataset's `NNNNN.tar` shards (a directory of them, a glob or tar paths; the
    `.parquet` and `_stats.json` files beside them are not inputs). One shard per tar; the image is
    `KEY.jpg` / `.jpeg` / `.png` / `.webp`, the web texts `KEY.txt` and the "caption" of `KEY.json`
    (equal texts kept once); meta keeps the url and img2dataset's key. Layout: data/webdataset.py.
  * annotations: the project's JSONL, a LAVIS json list or a COCO captions file (data/annotations.py)
    with images under `images_dir` (default: the file's directory). Records naming the same image
    are one sample (their captions its web texts, in file order), keyed by the image path; the
    samples are cut into logical shards of `records_per_shard`.
  * ArrayRecord: files in the project's record layout (data/sources.py; `python -m
    blip2_jax.data.convert`, or an earlier CapFilt output). One shard per file, or per range of
    `records_per_shard` records for a bigger file. Consecutive records of one image (written by
    convert --expand-captions) are one sample; a range boundary inside such a run leaves the whole
    run to the shard where it starts. Key: the header's "key", else its "image_path", else
    "FILE:INDEX".

A shard's `name` is unique and stable for the same inputs (the file's path below the inputs' common
directory, "/" written "-", extension dropped; a logical shard adds "-partNNNNN"): it names the
shard's output and lets a rerun skip it. `size` is the number of samples when known (for a tar:
the "successes" of img2dataset's stats file beside it, an estimate for progress bars; else None).

`Sample.error` is set (and `image` None) for a sample that cannot be used, with a short reason that
manifests count: "no image" (a tar sample without an image member, an empty ArrayRecord image),
"no image path", "image file not found", "cannot read image file". Images that are present but do
not decode are found by the caller, who decodes: `image_skip_reason(error)` names their reason.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Any, Iterator, Sequence

from blip2_jax.core.errors import UsageError
from blip2_jax.data import annotations, sources
from blip2_jax.data.webdataset import Damage, TarGroups

WEBDATASET, ANNOTATIONS, ARRAY_RECORD = "webdataset", "annotations", "array_record"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode formats, in order of preference
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ANNOTATION_SUFFIXES = (".jsonl", ".json")
STATS_SUFFIX = "_stats.json"  # img2dataset's counts beside each tar
TEXT_KEYS = frozenset(k for ks in annotations.TEXT_SCHEMAS.values() for k in ks)
# skip reasons (manifests count samples by these)
NO_IMAGE, NO_IMAGE_PATH, IMAGE_NOT_FOUND, IMAGE_UNREADABLE = (
    "no image", "no image path", "image file not found", "cannot read image file")
# reasons of `image_skip_reason`
NOT_AN_IMAGE, TRUNCATED_IMAGE, IMAGE_TOO_LARGE, CORRUPT_IMAGE = (
    "not an image", "truncated image", "image too large", "corrupt image")
_READ_CHUNK = 256  # ArrayRecord records read per call


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image of an input shard: `key` unique within its shard (a tar member's key, an annotation
  file's image path, an ArrayRecord header's key or image path); `image` the encoded file bytes
  (None when `error` says why it cannot be used); `web_texts` its texts ([] when it has none);
  `meta` small JSON-able facts to carry into the output (url, image_path, image_id, ...)."""
  key: str
  image: bytes | None
  web_texts: list[str]
  meta: dict
  error: str | None = None


class SampleStream:
  """The samples of one shard, in a fixed order; after the loop, `damage` (a `Damage`) is set when
  the shard stopped early, and `read` counts the samples yielded."""

  def __init__(self, samples: Iterator[Sample], damage_of=None):
    self._samples, self._damage_of = samples, damage_of
    self.read = 0

  @property
  def damage(self) -> Damage | None:
    return self._damage_of() if self._damage_of is not None else None

  def __iter__(self) -> Iterator[Sample]:
    for s in self._samples:
      self.read += 1
      yield s


@dataclasses.dataclass(frozen=True)
class InputShard:
  """One unit of work: a tar, a file's range of records or a file's range of annotation samples."""
  name: str
  format: str                # webdataset | annotations | array_record
  path: str                  # absolute
  size: int | None = None    # samples, when known
  start: int = 0             # annotations: sample index; array_record: record index
  stop: int | None = None
  images_dir: str | None = None
  _records: Any = dataclasses.field(default=None, compare=False, repr=False)  # annotations: the grouped samples

  def describe(self) -> dict:
    """What the shard is, JSON-able (run record, manifests)."""
    out = {"name": self.name, "format": self.format, "path": self.path, "size": self.size}
    if self.format != WEBDATASET:
      out.update(start=self.start, stop=self.stop)
    return out

  def samples(self) -> SampleStream:
    if self.format == WEBDATASET:
      groups = TarGroups(self.path)
      return SampleStream((_tar_sample(k, m) for k, m in groups), lambda: groups.damage)
    if self.format == ANNOTATIONS:
      return SampleStream(_annotation_samples(self._records[self.start:self.stop], self.images_dir))
    reader = _RecordRange(self.path, self.start, self.stop)
    return SampleStream(iter(reader), lambda: reader.damage)


# ----------------------------------------------------------------------------------------
# listing


def list_input_shards(inputs: str | os.PathLike | Sequence[str | os.PathLike], images_dir: str | None = None,
                      records_per_shard: int = 10_000) -> list[InputShard]:
  """The shards of `inputs` (see the module docstring), in input order (a directory's and a glob's
  files sorted). UsageError, one line naming the input, for an input that does not exist, holds
  no shard, is of no known format or cannot be read, and for two shards that would get one name."""
  if isinstance(inputs, (str, os.PathLike)):
    inputs = [inputs]
  if records_per_shard < 1:
    raise UsageError(f"records per shard {records_per_shard}: must be at least 1")
  if images_dir is not None and not os.path.isdir(images_dir):
    raise UsageError(f"images directory {images_dir}: not found")
  files: list[tuple[str, str]] = []  # (format, absolute path)
  for item in inputs:
    for f in _expand(os.fspath(item)):
      if all(os.path.realpath(f[1]) != os.path.realpath(g) for _, g in files):
        files.append(f)
  if not files:
    raise UsageError("no input given")
  root = os.path.commonpath([os.path.dirname(p) for _, p in files])
  shards: list[InputShard] = []
  for fmt, path in files:
    base = _strip_suffix(os.path.relpath(path, root)).replace(os.sep, "-")
    if fmt == WEBDATASET:
      shards.append(InputShard(base, fmt, path, _tar_size(path)))
    elif fmt == ANNOTATIONS:
      shards += _annotation_shards(base, path, images_dir, records_per_shard)
    else:
      shards += _array_record_shards(base, path, records_per_shard)
  seen: dict[str, str] = {}
  for s in shards:
    if s.name in seen:
      raise UsageError(f"inputs {seen[s.name]} and {s.path} would both name their output {s.name!r}; "
                       "give them from directories with other names")
    seen[s.name] = s.path
  return shards


def sample_seed(seed: int, key: str) -> int:
  """A uint32 seed for one image's random draws (CapFilt's caption sampling) from the run's seed and
  the image's key, never its position: the same on any number of processes or devices, and stable
  across Python runs (sha256, not the salted `hash`)."""
  digest = hashlib.sha256(f"{int(seed)}:{key}".encode("utf-8")).digest()
  return int.from_bytes(digest[:4], "little")


def shards_for_process(shards: Sequence[InputShard], process_index: int, process_count: int) -> list[InputShard]:
  """Process `process_index`'s share of `shards`: every `process_count`-th shard from its index, so
  every shard has exactly one process and the split depends on the shard order alone."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process {process_index} of {process_count}: need 0 <= index < count")
  return list(shards[process_index::process_count])


def _expand(item: str) -> list[tuple[str, str]]:
  """An input -> [(format, absolute path)]."""
  if os.path.isdir(item):
    names = sorted(os.listdir(item))
    for suffixes in (TAR_SUFFIXES, (".array_record",)):
      paths = [os.path.join(item, n) for n in names if n.endswith(suffixes)]
      if paths:
        return [_classify(p, item) for p in paths]
    raise UsageError(f"input {item}: the directory holds no .tar (img2dataset webdataset) or .array_record files")
  if os.path.isfile(item):
    return [_classify(item, item)]
  if glob.has_magic(item):  # its files of the known formats (not img2dataset's .parquet and _stats.json)
    paths = sorted(p for p in glob.glob(item) if os.path.isfile(p) and not p.endswith(STATS_SUFFIX)
                   and p.endswith(TAR_SUFFIXES + ANNOTATION_SUFFIXES + (".array_record",)))
    if not paths:
      raise UsageError(f"input {item}: no .tar, .jsonl / .json or .array_record file matches")
    return [_classify(p, item) for p in paths]
  try:  # a convert --output prefix
    return [_classify(p, item) for p in sources.shard_paths(item)]
  except FileNotFoundError:
    raise UsageError(f"input {item}: no such file or directory") from None


def _classify(path: str, item: str) -> tuple[str, str]:
  path = os.path.abspath(path)
  if path.endswith(TAR_SUFFIXES):
    return WEBDATASET, path
  if path.endswith(".array_record"):
    return ARRAY_RECORD, path
  if path.endswith(ANNOTATION_SUFFIXES):
    return ANNOTATIONS, path
  raise UsageError(f"input {item}: {os.path.basename(path)} is not a .tar (webdataset), .jsonl / .json "
                   "(annotations) or .array_record file")


def _strip_suffix(name: str) -> str:
  for suffix in TAR_SUFFIXES + ANNOTATION_SUFFIXES + (".array_record",):
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def _ranges(n: int, per_shard: int) -> list[tuple[int, int]]:
  return [(a, min(a + per_shard, n)) for a in range(0, n, per_shard)] or [(0, 0)]


def _parts(base: str, ranges, always: bool) -> list[tuple[str, int, int]]:
  if len(ranges) == 1 and not always:
    return [(base, *ranges[0])]
  return [(f"{base}-part{k:05d}", a, b) for k, (a, b) in enumerate(ranges)]


# ----------------------------------------------------------------------------------------
# webdataset


def _tar_size(path: str) -> int | None:
  """img2dataset's count of written samples, from NNNNN_stats.json beside NNNNN.tar (None without)."""
  stats = _strip_suffix(path) + STATS_SUFFIX
  try:
    with open(stats, encoding="utf-8") as f:
      n = json.load(f).get("successes")
    return int(n) if isinstance(n, int) and n >= 0 else None
  except (OSError, ValueError, AttributeError):
    return None


def _tar_sample(key: str, members: dict[str, bytes]) -> Sample:
  texts, meta = [], {}
  if "txt" in members:
    texts.append(members["txt"].decode("utf-8", errors="replace"))
  if "json" in members:
    try:
      info = json.loads(members["json"])
    except ValueError:
      info = None
    if isinstance(info, dict):
      if isinstance(info.get("caption"), str):
        texts.append(info["caption"])
      if isinstance(info.get("url"), str):
        meta["url"] = info["url"]
      if isinstance(info.get("key"), (str, int)):
        meta["img2dataset_key"] = info["key"]
  image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
  return Sample(key, image, _unique_texts(texts), meta, None if image else NO_IMAGE)


def _unique_texts(texts) -> list[str]:
  """Stripped, non-empty, each once, in order."""
  out = []
  for t in texts:
    t = t.strip() if isinstance(t, str) else ""
    if t and t not in out:
      out.append(t)
  return out


def _texts_of(record: dict) -> list:
  cap = record.get("caption")
  return list(cap) if isinstance(cap, (list, tuple)) else [cap]


# ----------------------------------------------------------------------------------------
# annotation files


def _annotation_shards(base: str, path: str, images_dir: str | None, per_shard: int) -> list[InputShard]:
  try:
    records = annotations.read_annotations(path)
  except (ValueError, UnicodeDecodeError) as e:
    raise UsageError(f"input {path}: {e}") from None
  grouped: dict[str, dict] = {}  # image path (or record number) -> {"key", "texts", "meta"}
  for i, rec in enumerate(records, 1):
    image = rec.get("image")
    key = image if isinstance(image, str) and image.strip() else f"record {i}"
    g = grouped.setdefault(key, {"key": key, "image": image if key == image else None, "texts": [],
                                 "meta": {k: v for k, v in rec.items() if k not in TEXT_KEYS and k != "image"}})
    g["texts"] += _texts_of(rec)
  samples = list(grouped.values())
  root = os.path.abspath(images_dir if images_dir is not None else os.path.dirname(path))
  return [InputShard(name, ANNOTATIONS, path, b - a, a, b, root, samples)
          for name, a, b in _parts(base, _ranges(len(samples), per_shard), always=True)]


def _annotation_samples(groups: list[dict], images_dir: str) -> Iterator[Sample]:
  for g in groups:
    texts, meta = _unique_texts(g["texts"]), dict(g["meta"])
    if g["image"] is None:
      yield Sample(g["key"], None, texts, meta, NO_IMAGE_PATH)
      continue
    meta["image_path"] = g["image"]
    try:
      with open(os.path.join(images_dir, g["image"]), "rb") as f:
        yield Sample(g["key"], f.read(), texts, meta)
    except FileNotFoundError:
      yield Sample(g["key"], None, texts, meta, IMAGE_NOT_FOUND)
    except OSError:
      yield Sample(g["key"], None, texts, meta, IMAGE_UNREADABLE)


# ----------------------------------------------------------------------------------------
# ArrayRecord files


def _reader(path: str):
  from array_record.python.array_record_module import ArrayRecordReader
  return ArrayRecordReader(path)


def _array_record_shards(base: str, path: str, per_shard: int) -> list[InputShard]:
  try:
    reader = _reader(path)
    n = reader.num_records()
    reader.close()
  except Exception as e:  # noqa: BLE001 - array_record raises RuntimeError / ValueError by its C++ status
    raise UsageError(f"input {path}: not a readable ArrayRecord file ({type(e).__name__}: {e})") from None
  return [InputShard(name, ARRAY_RECORD, path, b - a, a, b)
          for name, a, b in _parts(base, _ranges(n, per_shard), always=False)]


class _RecordRange:
  """Samples of records [start, stop) of an ArrayRecord file, runs of one image merged (see the
  module docstring); `damage` set when a record cannot be read."""

  def __init__(self, path: str, start: int, stop: int):
    self.path, self.start, self.stop = path, start, stop
    self.damage: Damage | None = None
    self._file = os.path.basename(path)

  def _key(self, header: dict, index: int) -> str:
    k = header.get("key", header.get("image_path"))
    return k if isinstance(k, str) and k else f"{self._file}:{index}"

  def _records(self, reader, first: int) -> Iterator[tuple[int, dict]]:
    n = reader.num_records()
    for a in range(first, n, _READ_CHUNK):
      b = min(a + _READ_CHUNK, n)
      try:
        chunk = reader.read(a, b)
      except Exception:  # noqa: BLE001 - read one at a time up to the record that fails
        chunk = None
      for i in range(a, b):
        self.failed = i  # what `damage` names if this record cannot be read
        yield i, sources.deserialize_record(chunk[i - a] if chunk is not None else reader.read([i])[0])

  def __iter__(self) -> Iterator[Sample]:
    self.damage, self.failed = None, self.start
    yielded, reader, run, error = 0, None, [], None
    try:
      reader = _reader(self.path)
      records = self._records(reader, max(self.start - 1, 0))
      prev = self._key(next(records)[1], self.start - 1) if self.start > 0 else None
      for index, rec in records:
        key = self._key(rec, index)
        if run and key == run[0]["_key"]:
          run.append(rec | {"_key": key})
          continue
        if run:
          yielded += 1
          yield _record_sample(run)
          run = []
        if index >= self.stop:
          break
        if key == prev:  # a run that began before `start` belongs to the previous shard
          continue
        run, prev = [rec | {"_key": key}], None
    except Exception as e:  # noqa: BLE001 - a corrupt file or record: the samples before it stand
      error = f"{type(e).__name__}: {e}"
    finally:
      if reader is not None:
        reader.close()
    if run:  # its image is whole (a record holds it); after damage, captions in later records are lost
      yielded += 1
      yield _record_sample(run)
    if error is not None:
      self.damage = Damage(yielded, None, error, record=self.failed)


def _record_sample(run: list[dict]) -> Sample:
  first = run[0]
  texts = [t for rec in run for t in _texts_of(rec)]
  meta = {k: v for k, v in first.items() if k not in TEXT_KEYS and k not in ("image", "key", "capfilt", "_key")}
  image = first.get("image") or None
  return Sample(first["_key"], image, _unique_texts(texts), meta, None if image else NO_IMAGE)


# ----------------------------------------------------------------------------------------
# decoding failures


def image_skip_reason(error: BaseException) -> str:
  """The manifest's reason for an image that did not decode (the ImageLoadError of
  data.transforms.decode_image, or what it wraps): "not an image" (Pillow cannot identify it),
  "truncated image", "image too large" (Pillow's decompression-bomb limit) or "corrupt image"."""
  cause = error.__cause__ if error.__cause__ is not None else error
  names = {c.__name__ for c in type(cause).__mro__}
  if "UnidentifiedImageError" in names:
    return NOT_AN_IMAGE
  if "DecompressionBombError" in names:
    return IMAGE_TOO_LARGE
  if "truncated" in str(cause).lower():
    return TRUNCATED_IMAGE
  return CORRUPT_IMAGE
