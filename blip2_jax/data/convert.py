"""Annotation file + image folder -> ArrayRecord shards that `ArrayRecordSource` reads.

    python -m blip2_jax.data.convert --annotations coco_karpathy_train.json --images-dir /data/coco \\
        --output /data/shards/coco_train --num-shards 64

writes /data/shards/coco_train-00000-of-00064.array_record ... Records keep their order (shard k
holds a contiguous block of the annotation file); each is serialised as in `sources.serialize_record`
(JSON header with all text fields + the original image file bytes, not re-encoded). By default a
record with a caption list stays one record (the train pipeline picks a caption at random per
step); `--expand-captions` writes one record per caption, as LAVIS's caption training sets.
The command line (its checks and messages) is blip2_jax/cli/convert.py.

Every image is decoded once before it is written: missing, truncated or non-image files are
skipped, reported on stderr by name and listed in `<output>.skipped.txt`; the exit status is 1
when no record could be written. Bad input (an annotation file that is missing or not valid, a
missing --images-dir, an --output prefix whose directory cannot be created, --num-shards below 1)
stops before anything is written: one line on stderr, exit status 2 (`--debug` shows the traceback).
"""
from __future__ import annotations

import os
import sys

from blip2_jax.core.progress import progress_bar
from blip2_jax.data.annotations import expand_captions, read_annotations
from blip2_jax.data.processing import ImageLoadError
from blip2_jax.data.sources import serialize_record
from blip2_jax.data.transforms import decode_image


def shard_name(prefix: str, k: int, n: int) -> str:
  return f"{prefix}-{k:05d}-of-{n:05d}.array_record"


def convert(annotations: str, images_dir: str, output: str, *, num_shards: int = 1, expand: bool = False,
            progress: bool = True) -> dict:
  """Writes the shards; returns {"written", "skipped": [(image path, reason)], "shards": [paths]}."""
  from array_record.python.array_record_module import ArrayRecordWriter

  records = read_annotations(annotations)
  if expand:
    records = expand_captions(records)
  if num_shards < 1:
    raise ValueError("--num-shards must be at least 1")
  num_shards = min(num_shards, max(len(records), 1))
  out_dir = os.path.dirname(os.path.abspath(output))
  os.makedirs(out_dir, exist_ok=True)
  shards = [shard_name(output, k, num_shards) for k in range(num_shards)]
  bounds = [len(records) * k // num_shards for k in range(num_shards + 1)]
  bar = progress_bar(len(records), f"writing {num_shards} shard(s)") if progress else None
  skipped, written = [], 0
  cache: dict[str, bytes | Exception] = {}  # a caption-expanded image is read once
  for k, path in enumerate(shards):
    writer = ArrayRecordWriter(path, "group_size:1")  # group size 1: cheap random access
    try:
      for rec in records[bounds[k]:bounds[k + 1]]:
        rel = rec.get("image")
        full = os.path.join(images_dir, rel) if isinstance(rel, str) else None
        if full not in cache:
          cache.clear()
          cache[full] = _read_checked(full, rel)
        data = cache[full]
        if isinstance(data, Exception):
          skipped.append((rel, str(data)))
          print(f"skipping {rel}: {data}", file=sys.stderr)
        else:
          writer.write(serialize_record(rec, data))
          written += 1
        if bar is not None:
          bar.update(1)
    finally:
      writer.close()
  if bar is not None:
    bar.close()
  if skipped:
    with open(output + ".skipped.txt", "w") as f:
      f.writelines(f"{p}\t{why}\n" for p, why in skipped)
  return {"written": written, "skipped": skipped, "shards": shards}


def _read_checked(full: str | None, rel) -> bytes | Exception:
  if full is None:
    return ImageLoadError(f'record without an "image" path: {rel!r}')
  try:
    with open(full, "rb") as f:
      data = f.read()
    decode_image(data, name=full)
    return data
  except ImageLoadError as e:
    return e
  except OSError as e:
    return ImageLoadError(f"cannot read image {full}: {type(e).__name__}: {e}")


if __name__ == "__main__":
  from blip2_jax.cli import convert as command  # python -m blip2_jax.data.convert: the command line
  sys.exit(command.main())
