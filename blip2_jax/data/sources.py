"""Random-access data sources for the grain pipelines: annotation files, TFDS, ArrayRecord shards.

Every source has `len(src)` and `src[i] -> dict`, one record. A record holds
  "image": where the pixels are: an absolute path (annotation files), the encoded file bytes
           (ArrayRecord) or a decoded uint8 (H, W, 3) array (TFDS);
  "image_path": the image's name as the annotation gave it (for error messages and bookkeeping);
  the text fields, kept as they are: "caption" (str, or a list of str: the train pipeline then
  picks one at random per step), "question" + "answers", "instruction" + "response", and any
  metadata ("image_id", "question_id", ...).

Annotation formats (`read_annotations`):
  * LAVIS: a JSON list of {"image": relative path, "caption": str | [str, ...], ...};
  * COCO captions: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]},
    grouped into one record per image with the list of its captions;
  * JSONL: one JSON object per line, the fine-tuning format
    {"image", "caption"} | {"image", "question", "answers": [...]} | {"image", "instruction", "response"}.
`AnnotationSource(..., expand_captions=True)` turns a caption list into one record per caption
(LAVIS's caption training sets hold one record per caption). `validate_annotations` reports bad
lines up front.

ArrayRecord record layout (written by `blip2_jax.data.convert`, read by `ArrayRecordSource`):
    b"B2JR" | header length (uint32, little endian) | header (UTF-8 JSON object) | image file bytes
The header is the annotation record without "image" (its path moves to "image_path"); the image
bytes are the original file, not re-encoded. No dependency beyond the standard library.
"""
from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any, Callable, Iterable, Sequence

import numpy as np

TEXT_SCHEMAS = {  # schema name -> required text fields
    "caption": ("caption",),
    "vqa": ("question", "answers"),
    "instruction": ("instruction", "response"),
}
META_KEYS = frozenset({"image_id", "question_id", "id", "instance_id", "dataset"})
KNOWN_KEYS = frozenset({"image"}) | {k for ks in TEXT_SCHEMAS.values() for k in ks} | META_KEYS

_MAGIC = b"B2JR"


# ----------------------------------------------------------------------------------------
# annotation files
# ----------------------------------------------------------------------------------------
def _read_raw(path: str) -> tuple[str, list[tuple[int, Any]]]:
  """(unit, [(number, parsed object or Exception)]): unit "line" numbers JSONL physical file lines,
  unit "record" numbers the records of a JSON list (COCO captions: its images that have captions); both from 1."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"annotation file not found: {path}")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".jsonl") or (not text.lstrip().startswith(("[", "{")) or _looks_jsonl(text)):
    out = []
    for n, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        out.append((n, json.loads(line)))
      except json.JSONDecodeError as e:
        out.append((n, ValueError(f"invalid JSON: {e}")))
    return "line", out
  data = json.loads(text)
  if isinstance(data, dict) and "images" in data and "annotations" in data:
    return "record", list(enumerate(_group_coco(data), 1))
  if isinstance(data, dict) and "annotations" in data:  # some LAVIS files wrap the list
    data = data["annotations"]
  elif isinstance(data, dict) and "image" in data:  # a one-line JSONL file
    return "line", [(1, data)]
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of records, a COCO captions file or JSONL")
  return "record", list(enumerate(data, 1))


def location(path: str | os.PathLike, unit: str, n: int) -> str:
  """Where a record is, for messages: "PATH:N" for line N of a JSONL file (as compilers write it),
  "PATH: record N" for the N-th record of a JSON list; both count from 1."""
  return f"{os.fspath(path)}:{n}" if unit == "line" else f"{os.fspath(path)}: record {n}"


def _looks_jsonl(text: str) -> bool:
  """A file of several top-level JSON objects, one a line."""
  lines = [l for l in text.splitlines() if l.strip()]
  if len(lines) < 2 or not lines[0].lstrip().startswith("{"):
    return False
  try:
    json.loads(lines[0])
    return True
  except json.JSONDecodeError:
    return False


def _group_coco(data: dict) -> list[dict]:
  caps: dict[Any, list[str]] = {}
  for a in data["annotations"]:
    caps.setdefault(a["image_id"], []).append(a["caption"])
  return [{"image": im["file_name"], "caption": caps.get(im["id"], []), "image_id": im["id"]}
          for im in data["images"] if im["id"] in caps]


def read_annotations(path: str | os.PathLike) -> list[dict]:
  """Reads a LAVIS JSON list, a COCO captions JSON or a JSONL file -> list of record dicts (unexpanded).

  Raises ValueError naming the line for a line that is not a JSON object (run `validate_annotations`
  for a report of all problems at once).
  """
  out = []
  unit, raw = _read_raw(os.fspath(path))
  for n, rec in raw:
    if isinstance(rec, Exception) or not isinstance(rec, dict):
      raise ValueError(f"{location(path, unit, n)}: {rec if isinstance(rec, Exception) else 'not a JSON object'}")
    out.append(rec)
  return out


def schema_of(record: dict) -> str | None:
  """'caption', 'vqa' or 'instruction' by the text fields present; None when none is."""
  for name, keys in TEXT_SCHEMAS.items():
    if keys[0] in record:
      return name
  return None


def _type_name(v) -> str:
  return {str: "a string", list: "a list", dict: "an object", bool: "a boolean", int: "a number",
          float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _text_problem(key: str, v) -> str | None:
  """What is wrong with text field `key` (None when nothing): "caption" is a string or a list of
  strings, "answers" a list of strings, the others a string; no text may be empty."""
  if key == "answers":
    if not isinstance(v, list):
      return f'"answers" must be a list of strings, not {_type_name(v)}'
  elif key == "caption":
    if not isinstance(v, (str, list)):
      return f'"caption" must be a string or a list of strings, not {_type_name(v)} ({json.dumps(v)[:40]})'
  elif not isinstance(v, str):
    return f'"{key}" must be a string, not {_type_name(v)} ({json.dumps(v)[:40]})'
  if isinstance(v, str):
    return None if v.strip() else f'empty text in "{key}"'
  if not v:
    return f'"{key}" is an empty list'
  bad = [x for x in v if not isinstance(x, str)]
  if bad:
    return f'"{key}" must hold strings, found {_type_name(bad[0])} ({json.dumps(bad[0])[:40]})'
  if not all(x.strip() for x in v):
    return f'empty text in "{key}"'
  return None


def _image_problem(rec: dict, root: str, check_files: bool) -> str | None:
  if "image" not in rec:
    return 'missing "image" path'
  img = rec["image"]
  if not isinstance(img, str):
    return f'"image" must be a path string, not {_type_name(img)} ({json.dumps(img)[:60]})'
  if not img.strip():
    return 'empty "image" path'
  if check_files:
    full = os.path.join(root, img)
    if not os.path.isfile(full):
      return f"image file not found: {full}"
  return None


def _unreadable_image(path: str) -> str | None:
  """Why the file at `path` is not an image Pillow can open (its header only: cheap), or None."""
  import PIL.Image
  try:
    with PIL.Image.open(path) as im:
      im.size  # noqa: B018 - the header is parsed on open; size is what every format has
  except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
    return f"not a readable image: {path} ({type(e).__name__}: {e})"
  return None


# Keys people write by mistake -> what the format calls them (named in the "unknown keys" report).
KEY_HINTS = {"answer": "answers", "captions": "caption", "text": "caption", "image_path": "image", "file_name": "image",
             "output": "response", "prompt": "instruction", "input": "instruction"}


class Problems(list):
  """[(number, problem)] from `validate_annotations`; `unit` says what the numbers count: "line"
  (JSONL file lines) or "record" (records of a JSON list, or of a list of dicts), both from 1."""

  def __init__(self, items=(), unit: str = "line"):
    super().__init__(items)
    self.unit = unit


def validate_annotations(records: str | os.PathLike | Sequence[dict], images_dir: str | os.PathLike | None,
                         *, extra_keys: Iterable[str] = (), check_files: bool = True,
                         check_images: bool = False, kinds: Iterable[str] | None = None) -> Problems:
  """Checks every record up front -> Problems [(number, problem)], empty when all is well.

  `records` is a path (numbers are JSONL file lines, or record numbers in a JSON list, from 1) or a
  list of dicts (record numbers from 1); `Problems.unit` says which. Problems: invalid JSON, not an
  object, no "image" or one that is not a path string, image file missing (when `check_files`) or
  not an image Pillow can open (when `check_images`: reads each file's header only, so a file cut
  short inside its pixel data still passes), no known text field, a required text field missing,
  empty or of the wrong type ("caption": a string or a list of strings; "answers": a list of strings;
  "question", "instruction", "response": a string), fields of two record kinds in one record, a kind
  outside `kinds` (a subset of TEXT_SCHEMAS: what the task trains on), unknown keys (anything outside
  the three schemas, META_KEYS and `extra_keys`; a likely misspelling is named, e.g. "answer" -> "answers").
  """
  if isinstance(records, (str, os.PathLike)):
    unit, raw = _read_raw(os.fspath(records))
  else:
    unit, raw = "record", list(enumerate(records, 1))
  known = KNOWN_KEYS | set(extra_keys)
  allowed = None if kinds is None else tuple(kinds)
  for k in allowed or ():
    if k not in TEXT_SCHEMAS:
      raise ValueError(f"unknown record kind {k!r}; choose from {sorted(TEXT_SCHEMAS)}")
  root = os.fspath(images_dir) if images_dir is not None else ""
  problems = Problems(unit=unit)
  for n, rec in raw:
    if isinstance(rec, Exception):
      problems.append((n, str(rec)))
      continue
    if not isinstance(rec, dict):
      problems.append((n, f"not a JSON object ({type(rec).__name__})"))
      continue
    img_problem = _image_problem(rec, root, check_files)
    if img_problem is None and check_files and check_images:
      img_problem = _unreadable_image(os.path.join(root, rec["image"]))
    if img_problem is not None:
      problems.append((n, img_problem))
    present = [name for name, keys in TEXT_SCHEMAS.items() if any(k in rec for k in keys)]
    schema = schema_of(rec)
    if len(present) > 1:
      fields = ", ".join(k for s in present for k in TEXT_SCHEMAS[s] if k in rec)
      problems.append((n, f"mixes the fields of {' and '.join(present)} records ({fields}); one kind per record"))
    elif schema is None and present:
      schema = present[0]  # e.g. "answers" without "question": reported as a missing field below
    if schema is None:
      problems.append((n, f"no text field: expected one of {[k[0] for k in TEXT_SCHEMAS.values()]}"))
    else:
      if allowed is not None and schema not in allowed:
        problems.append((n, f"a {schema} record, but this task takes {' or '.join(allowed)} records "
                            f"({' | '.join('+'.join(TEXT_SCHEMAS[a]) for a in allowed)})"))
      for k in TEXT_SCHEMAS[schema]:
        if k not in rec:
          problems.append((n, f'{schema} record without "{k}"'))
        else:
          why = _text_problem(k, rec[k])
          if why:
            problems.append((n, why))
    unknown = sorted(set(rec) - known)
    if unknown:
      hints = [f"{k} (did you mean {KEY_HINTS[k]!r}?)" if k in KEY_HINTS else k for k in unknown]
      problems.append((n, f"unknown keys: {', '.join(hints)}"))
  return problems


def format_problems(problems: Sequence[tuple[int, str]], path: str, *, limit: int = 50) -> str:
  """A report of `validate_annotations` problems: a summary line, then one "PATH:LINE: problem" (JSONL)
  or "PATH: record N: problem" (JSON list) line per problem (the first `limit`)."""
  unit = getattr(problems, "unit", "line")
  where = sorted({n for n, _ in problems})
  out = [f"{path}: {len(problems)} problem(s) {'on' if unit == 'line' else 'in'} {len(where)} {unit}(s):"]
  out += [f"  {location(path, unit, n)}: {p}" for n, p in problems[:limit]]
  if len(problems) > limit:
    out.append(f"  ... and {len(problems) - limit} more")
  return "\n".join(out)


def expand_captions(records: Sequence[dict]) -> list[dict]:
  """One record per caption where "caption" is a list (other records unchanged)."""
  out = []
  for r in records:
    if isinstance(r.get("caption"), (list, tuple)):
      out.extend({**r, "caption": c} for c in r["caption"])
    else:
      out.append(r)
  return out


_expand = expand_captions


class AnnotationSource:
  """Random-access source over annotation records; `src[i]` has "image" as an absolute path.

      src = AnnotationSource.from_file("coco_karpathy_train.json", images_dir="/data/coco")

  Nothing is opened until the pipeline decodes the image, so a missing or corrupt file becomes a
  counted skip there, not an error here (run `validate_annotations` for an up-front report).
  """

  def __init__(self, records: Sequence[dict], images_dir: str | os.PathLike | None = None, *,
               expand_captions: bool = True):
    self.images_dir = os.path.abspath(os.fspath(images_dir)) if images_dir is not None else os.getcwd()
    recs = _expand(records) if expand_captions else list(records)
    for i, r in enumerate(recs):
      if not isinstance(r, dict) or not isinstance(r.get("image"), str):
        raise ValueError(f"annotation record {i} has no \"image\" path: {r!r:.200}")
    self._records = recs

  @classmethod
  def from_file(cls, path: str | os.PathLike, images_dir: str | os.PathLike | None = None, **kw):
    """`images_dir` defaults to the annotation file's directory."""
    if images_dir is None:
      images_dir = os.path.dirname(os.path.abspath(os.fspath(path)))
    return cls(read_annotations(path), images_dir, **kw)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    r = self._records[index]
    return {**r, "image": os.path.join(self.images_dir, r["image"]), "image_path": r["image"]}

  def __repr__(self):
    return f"AnnotationSource({len(self)} records, images_dir={self.images_dir!r})"


# ----------------------------------------------------------------------------------------
# ArrayRecord
# ----------------------------------------------------------------------------------------
def serialize_record(record: dict, image_bytes: bytes) -> bytes:
  """`record` (texts, metadata, "image" path) + encoded image -> one ArrayRecord record (layout above)."""
  header = {k: v for k, v in record.items() if k != "image"}
  if "image" in record:
    header.setdefault("image_path", record["image"])
  h = json.dumps(header, ensure_ascii=False).encode("utf-8")
  return _MAGIC + struct.pack("<I", len(h)) + h + bytes(image_bytes)


def deserialize_record(data: bytes) -> dict:
  """Inverse of `serialize_record`: the header dict with "image" = the encoded image bytes."""
  data = bytes(data)
  if data[:4] != _MAGIC:
    raise ValueError("not a blip2_jax ArrayRecord record (bad magic); write shards with blip2_jax.data.convert")
  (n,) = struct.unpack("<I", data[4:8])
  rec = json.loads(data[8:8 + n].decode("utf-8"))
  rec["image"] = data[8 + n:]
  return rec


def shard_paths(prefix_or_paths: str | os.PathLike | Sequence[str]) -> list[str]:
  """A list of .array_record files, one file, or the `--output` prefix of convert (its shards, sorted)."""
  if not isinstance(prefix_or_paths, (str, os.PathLike)):
    return [os.fspath(p) for p in prefix_or_paths]
  p = os.fspath(prefix_or_paths)
  if os.path.isfile(p):
    return [p]
  paths = sorted(glob.glob(glob.escape(p) + "-*-of-*.array_record"))
  if not paths:
    paths = sorted(glob.glob(p))
  if not paths:
    raise FileNotFoundError(f"no ArrayRecord shards found for {p} (expected {p}-00000-of-NNNNN.array_record)")
  return paths


class ArrayRecordSource:
  """Records written by `blip2_jax.data.convert`, read through grain's `ArrayRecordDataSource`.

  `src[i]` is the record dict with "image" = the encoded image bytes. With `expand_captions` a
  record holding a caption list is served as one record per caption (the index of all (record,
  caption) pairs is built once by reading every header).
  """

  def __init__(self, paths: str | os.PathLike | Sequence[str], *, expand_captions: bool = False):
    import grain
    self.paths = shard_paths(paths)
    self._ds = grain.sources.ArrayRecordDataSource(self.paths)
    self._pairs = None
    if expand_captions:
      pairs = []
      for i in range(len(self._ds)):
        caps = self._header(i).get("caption")
        pairs.extend((i, c) for c in range(len(caps))) if isinstance(caps, list) else pairs.append((i, -1))
      self._pairs = np.asarray(pairs, np.int64).reshape(-1, 2)

  def _header(self, i: int) -> dict:
    data = self._ds[i]
    (n,) = struct.unpack("<I", data[4:8])
    return json.loads(data[8:8 + n].decode("utf-8"))

  def __len__(self) -> int:
    return len(self._ds) if self._pairs is None else len(self._pairs)

  def __getitem__(self, index: int) -> dict:
    if self._pairs is None:
      return deserialize_record(self._ds[int(index)])
    i, c = (int(v) for v in self._pairs[index])
    rec = deserialize_record(self._ds[i])
    if c >= 0:
      rec["caption"] = rec["caption"][c]
    return rec

  def __repr__(self):
    return f"ArrayRecordSource({len(self)} records, {len(self.paths)} shards)"


# ----------------------------------------------------------------------------------------
# TFDS
# ----------------------------------------------------------------------------------------
def _text(v):
  if isinstance(v, bytes):
    return v.decode("utf-8")
  if isinstance(v, np.ndarray):
    return [_text(x) for x in v.tolist()] if v.ndim else _text(v.item())
  if isinstance(v, (list, tuple)):
    return [_text(x) for x in v]
  return v


def tfds_to_record(example: dict) -> dict:
  """Default TFDS example -> record: "image" (uint8 array or encoded bytes) and the captions.

  Handles `coco_captions` ("captions": {"text": [...]}, "image/id", "image/filename") and flat
  datasets with "caption" / "text" / "question" / "answers" / ... fields.
  """
  rec = {"image": example["image"]}
  caps = example.get("captions")
  if isinstance(caps, dict) and "text" in caps:
    rec["caption"] = _text(caps["text"])
  for k in ("caption", "question", "answers", "instruction", "response"):
    if k in example:
      rec[k] = _text(example[k])
  if "caption" not in rec and "text" in example:
    rec["caption"] = _text(example["text"])
  if "image/id" in example:
    rec["image_id"] = int(np.asarray(example["image/id"]))
  if "image/filename" in example:
    rec["image_path"] = _text(example["image/filename"])
  return rec


class TfdsSource:
  """A prepared TFDS dataset through `tfds.data_source` (random access; never downloads).

      src = TfdsSource("coco_captions", split="train", data_dir="/data/tfds")

  The dataset must have been prepared in the ArrayRecord file format, e.g.
  `tfds build coco_captions --data_dir /data/tfds --file_format array_record`. `record_fn` maps a
  TFDS example to a record (default `tfds_to_record`).
  """

  def __init__(self, name: str, *, split: str = "train", data_dir: str | os.PathLike | None = None,
               record_fn: Callable[[dict], dict] = tfds_to_record, **data_source_kwargs):
    try:
      import tensorflow_datasets as tfds
    except ImportError as e:
      raise ImportError("TfdsSource needs tensorflow-datasets: pip install tensorflow-datasets") from e
    self.name, self.split, self.record_fn = name, split, record_fn
    self.data_dir = os.fspath(data_dir) if data_dir is not None else None
    where = self.data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=self.data_dir, download=False,
                                  **data_source_kwargs)
    except Exception as e:  # tfds raises AssertionError / DatasetNotFoundError / NotImplementedError
      raise FileNotFoundError(
          f"TFDS dataset {name!r} (split {split!r}) is not available in {where}: {type(e).__name__}: {e}. "
          f"Prepare it first (in the ArrayRecord file format), e.g. `tfds build {name} --file_format "
          f"array_record" + (f" --data_dir {self.data_dir}`" if self.data_dir else "`")) from e

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict:
    return self.record_fn(self._ds[int(index)])

  def __repr__(self):
    return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"
