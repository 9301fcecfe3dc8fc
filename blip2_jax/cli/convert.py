"""python -m blip2_jax.data.convert --annotations FILE --images-dir DIR --output PREFIX [--num-shards N]
(installed: blip2-convert)

Writes ArrayRecord shards of an annotation file and its images (`blip2_jax.data.convert.convert`).
Bad input (an annotation file that is missing or not valid, a missing --images-dir, an image path that
leads outside it unless --allow-outside-images-dir, an --output prefix whose directory cannot be
created, --num-shards below 1, a flag given twice) stops before anything is written: one line
on stderr, exit status 2 (`--debug` shows the traceback). Unreadable images are skipped and listed;
the exit status is 1 when no record could be written.
"""
from __future__ import annotations

import os
import sys

from blip2_jax.cli import options
from blip2_jax.cli.options import UsageError
from blip2_jax.data.annotations import outside_report, read_annotations
from blip2_jax.data.convert import convert


def parser():
  p = options.Parser(prog="python -m blip2_jax.data.convert", description=__doc__.split("\n\n")[0])
  p.add_argument("--annotations", required=True, help="LAVIS JSON list, COCO captions JSON or JSONL")
  p.add_argument("--images-dir", required=True, help="root the annotation image paths are relative to")
  p.add_argument("--output", required=True, help="output prefix: writes PREFIX-00000-of-0000N.array_record")
  p.add_argument("--num-shards", type=options.positive_int, default=1, help="files to write (default 1)")
  p.add_argument("--expand-captions", action="store_true", help="one record per caption of a caption list")
  p.add_argument("--no-progress", action="store_true")
  options.add_image_args(p, annotations_dir=True)
  return p


def check_args(a) -> None:
  """UsageError for inputs that would fail the conversion, before anything is written."""
  options.check_input_file(a.annotations, "--annotations")
  options.check_input_dir(a.images_dir, "--images-dir")
  if os.path.isdir(a.output):
    raise UsageError(f"--output {a.output}: is a directory; give a prefix such as {os.path.join(a.output, 'train')}")
  options.check_new_dir(os.path.dirname(os.path.abspath(a.output)), f"--output {a.output}: directory")
  try:
    records = read_annotations(a.annotations)
  except (ValueError, OSError, UnicodeDecodeError) as e:
    named = str(e).startswith(a.annotations)  # read_annotations' messages start with the path
    raise UsageError(f"--annotations {'' if named else a.annotations + ': '}{e}") from None
  if not records:
    raise UsageError(f"--annotations {a.annotations}: holds no records")
  outside = None if a.allow_outside_images_dir else outside_report((r.get("image") for r in records), a.images_dir)
  if outside:
    raise UsageError(f"--annotations {a.annotations}: {outside}")


def main(argv=None) -> int:
  return options.run(_main, argv)


def _main(argv) -> int:
  a = parser().parse_args(argv)
  options.apply_image_args(a)
  check_args(a)
  res = convert(a.annotations, a.images_dir, a.output, num_shards=a.num_shards, expand=a.expand_captions,
                progress=not a.no_progress)
  print(f"wrote {res['written']} records to {len(res['shards'])} shard(s) at {a.output}-*.array_record")
  if res["skipped"]:
    files = list(dict.fromkeys(p for p, _ in res["skipped"]))  # a caption-expanded image is one file, many records
    print(f"skipped {len(res['skipped'])} record(s) of {len(files)} unreadable image file(s), listed in "
          f"{a.output}.skipped.txt:", file=sys.stderr)
    for path in files[:20]:
      print(f"  {path}", file=sys.stderr)
    if len(files) > 20:
      print(f"  ... and {len(files) - 20} more", file=sys.stderr)
  return 0 if res["written"] else 1
