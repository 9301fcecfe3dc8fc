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

ArrayRecord record layout (written by `blip2_jax.data.convert` and by CapFilt, data/capfilt_shards.py;
read by `ArrayRecordSource`):
    b"B2JR" | header length (uint32, little endian) | header (UTF-8 JSON object) | image file bytes
The header is the annotation record without "image" (its path moves to "image_path"); the image
bytes are the original file, not re-encoded. No dependency beyond the standard library.
"""
from __future__ import annotations

import glob
import json
import os
import struct
from typing import Callable, Sequence

import numpy as np

from blip2_jax.data import annotations

_MAGIC = b"B2JR"
CAPFILT_RUN_FILE = "capfilt.json"  # marks a CapFilt output directory (data/capfilt_shards.py)




class AnnotationSource:
  """Random-access source over annotation records; `src[i]` has "image" as an absolute path.

      src = AnnotationSource.from_file("coco_karpathy_train.json", images_dir="/data/coco")

  Nothing is opened until the pipeline decodes the image, so a missing or corrupt file becomes a
  counted skip there, not an error here (run `validate_annotations` for an up-front report).
  """

  def __init__(self, records: Sequence[dict], images_dir: str | os.PathLike | None = None, *,
               expand_captions: bool = True):
    self.images_dir = os.path.abspath(os.fspath(images_dir)) if images_dir is not None else os.getcwd()
    recs = annotations.expand_captions(records) if expand_captions else list(records)
    for i, r in enumerate(recs):
      if not isinstance(r, dict) or not isinstance(r.get("image"), str):
        raise ValueError(f"annotation record {i} has no \"image\" path: {r!r:.200}")
    self._records = recs

  @classmethod
  def from_file(cls, path: str | os.PathLike, images_dir: str | os.PathLike | None = None, **kw):
    """`images_dir` defaults to the annotation file's directory."""
    if images_dir is None:
      images_dir = os.path.dirname(os.path.abspath(os.fspath(path)))
    return cls(annotations.read_annotations(path), images_dir, **kw)

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
  """A list of .array_record files, one file, a directory of them, or the `--output` prefix of
  convert (its shards); a directory's and a prefix's files sorted."""
  if not isinstance(prefix_or_paths, (str, os.PathLike)):
    return [os.fspath(p) for p in prefix_or_paths]
  p = os.fspath(prefix_or_paths)
  if os.path.isfile(p):
    return [p]
  if os.path.isdir(p):
    if os.path.isfile(os.path.join(p, CAPFILT_RUN_FILE)):
      raise ValueError(f"{p} is a CapFilt output directory: read its complete shards through "
                       "blip2_jax.data.capfilt_shards.array_record_paths")
    paths = sorted(glob.glob(os.path.join(glob.escape(p), "*.array_record")))
    if not paths:
      raise FileNotFoundError(f"no .array_record files in directory {p}")
    return paths
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
