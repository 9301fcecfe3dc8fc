"""Annotation files: the one reader of LAVIS JSON lists, COCO caption files and JSON Lines, its
up-front validation, and the views evaluation needs.

Formats (`read_annotations`):
  * LAVIS: a JSON list of {"image": relative path, "caption": str | [str, ...], ...};
  * COCO captions: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]},
    grouped into one record per image with the list of its captions;
  * JSONL: one JSON object per line, the fine-tuning format
    {"image", "caption"} | {"image", "question", "answers": [...]} | {"image", "instruction", "response"}.
A record is named in messages by `location`: "FILE:N" for line N of a JSON Lines file, "FILE: record N"
for the N-th record of a JSON list; both count from 1.

    recs = read_annotations("train.jsonl")                # list of record dicts
    problems = validate_annotations("train.jsonl", "images/", kinds=("caption",))
    refs = caption_references("coco_karpathy_test.json")  # [{"image", "refs": [...]}] (evaluation)
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

from blip2_jax.data import processing
from blip2_jax.data.transforms import empty_after_cleaning

TEXT_SCHEMAS = {  # schema name -> required text fields
    "caption": ("caption",),
    "vqa": ("question", "answers"),
    "instruction": ("instruction", "response"),
}
META_KEYS = frozenset({"image_id", "question_id", "id", "instance_id", "dataset"})
KNOWN_KEYS = frozenset({"image"}) | {k for ks in TEXT_SCHEMAS.values() for k in ks} | META_KEYS


class AnnotationError(ValueError):
  """An annotation file is unreadable or malformed; the message names the file and the record."""


def read_utf8(path: str) -> str:
  """The text of a UTF-8 file; AnnotationError naming the line and column of a byte that is not UTF-8
  (Python's own message gives a byte offset, which no editor shows)."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    col = len(data[data.rfind(b"\n", 0, e.start) + 1:e.start].decode("utf-8", "replace")) + 1
    raise AnnotationError(f"{path}:{line}:{col}: byte 0x{data[e.start]:02x} is not UTF-8 ({e.reason}); the file must "
                          "be UTF-8 text (re-encode it, e.g. iconv -f latin1 -t utf-8)") from None


def _read_raw(path: str) -> tuple[str, list[tuple[int, Any]]]:
  """(unit, [(number, parsed object or Exception)]): unit "line" numbers JSONL physical file lines,
  unit "record" numbers the records of a JSON list (COCO captions: its images that have captions); both from 1."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"annotation file not found: {path}")
  text = read_utf8(path)
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
  if isinstance(data, dict) and "image" in data:  # a one-line JSONL file
    return "line", [(1, data)]
  if isinstance(data, dict):  # some LAVIS / VQA files wrap the list
    data = next((data[k] for k in ("annotations", "data", "questions") if isinstance(data.get(k), list)), data)
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
  """COCO captions -> one record per image that has captions, {"image": file_name, "caption": [...]}."""
  images, anns = data["images"], data["annotations"]
  if not isinstance(images, list) or not isinstance(anns, list):
    raise ValueError("a COCO captions file holds lists under 'images' and 'annotations'")
  caps: dict[Any, list] = {}
  for n, a in enumerate(anns, 1):
    if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
      raise ValueError(f"annotations record {n}: needs 'image_id' and 'caption'")
    caps.setdefault(a["image_id"], []).append(a["caption"])
  out = []
  for n, im in enumerate(images, 1):
    if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
      raise ValueError(f"images record {n}: needs 'id' and 'file_name'")
    if im["id"] in caps:
      out.append({"image": im["file_name"], "caption": caps[im["id"]], "image_id": im["id"]})
  return out


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
    v = [v]
  elif not v:
    return f'"{key}" is an empty list'
  bad = [x for x in v if not isinstance(x, str)]
  if bad:
    return f'"{key}" must hold strings, found {_type_name(bad[0])} ({json.dumps(bad[0])[:40]})'
  if not all(x.strip() for x in v):
    return f'empty text in "{key}"'
  if key == "caption":
    empty = [x for x in v if empty_after_cleaning(x)]
    if empty:
      return (f'{len(empty)} caption(s) empty after cleaning ({", ".join(json.dumps(x) for x in empty[:3])}): '
              'pre_caption drops . ! " ( ) * # : ; ~ and what is left is blank or invisible')
  return None


def leaves_images_dir(image: str) -> bool:
  """True for an image path that leads outside the directory it is relative to: an absolute path, or
  one whose `..` climbs above it. Lexical (symbolic links inside the directory may point anywhere)."""
  norm = os.path.normpath(image)
  return os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep)


OUTSIDE_FLAG = "--allow-outside-images-dir"


def outside_problem(image: str, images_dir: str) -> str:
  return (f"image path {image!r} leads outside the images directory {images_dir} (absolute, or up with ..); "
          f"{OUTSIDE_FLAG} reads such paths")


def outside_report(images: Iterable, images_dir: str) -> str | None:
  """One line naming the first image path of `images` that leads outside `images_dir` and how many do,
  or None when none does (non-strings are left to the record checks)."""
  outside = [p for p in dict.fromkeys(i for i in images if isinstance(i, str)) if leaves_images_dir(p)]
  if not outside:
    return None
  return outside_problem(outside[0], images_dir) + (f" ({len(outside)} such paths)" if len(outside) > 1 else "")


def _image_problem(rec: dict, root: str, check_files: bool, allow_outside: bool = True) -> str | None:
  if "image" not in rec:
    return 'missing "image" path'
  img = rec["image"]
  if not isinstance(img, str):
    return f'"image" must be a path string, not {_type_name(img)} ({json.dumps(img)[:60]})'
  if not img.strip():
    return 'empty "image" path'
  if not allow_outside and leaves_images_dir(img):
    return outside_problem(img, root)
  if check_files:
    full = os.path.join(root, img)
    if not os.path.isfile(full):
      return f"image file not found: {full}"
  return None


def _unreadable_image(path: str) -> str | None:
  """Why the file at `path` is not an image Pillow can open (its header only: cheap), or None; an image
  above `processing.max_image_pixels` says so and names the setting that allows it."""
  try:
    with processing.open_image(path, path) as im:
      im.size  # noqa: B018 - the header is parsed on open; size is what every format has
  except processing.ImageLoadError as e:
    return str(e)
  except (OSError, ValueError, SyntaxError) as e:
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
                         check_images: bool = False, kinds: Iterable[str] | None = None,
                         allow_outside_images_dir: bool = False) -> Problems:
  """Checks every record up front -> Problems [(number, problem)], empty when all is well.

  `records` is a path (numbers are JSONL file lines, or record numbers in a JSON list, from 1) or a
  list of dicts (record numbers from 1); `Problems.unit` says which. Problems: invalid JSON, not an
  object, no "image" or one that is not a path string, image file missing (when `check_files`) or
  not an image Pillow can open (when `check_images`: reads each file's header only, so a file cut
  short inside its pixel data still passes), no known text field, a required text field missing,
  empty or of the wrong type ("caption": a string or a list of strings; "answers": a list of strings;
  "question", "instruction", "response": a string), a caption empty after `pre_caption` ("...", a
  zero-width space: training would learn from nothing), an image path that leads outside `images_dir`
  (absolute or climbing with .., unless `allow_outside_images_dir`), fields of two record kinds in one record, a kind
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
    img_problem = _image_problem(rec, root, check_files, allow_outside_images_dir or images_dir is None)
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


# ----------------------------------------------------------------------------------------
# evaluation views


def _located(path: str) -> list[tuple[str, Any]]:
  """[(where, record)] of an annotation file, read by `_read_raw` (the one reader); AnnotationError
  naming the file, or the record, for what cannot be read."""
  path = os.fspath(path)
  try:
    unit, raw = _read_raw(path)
  except AnnotationError:
    raise
  except FileNotFoundError as e:
    raise AnnotationError(str(e)) from None
  except (OSError, UnicodeDecodeError) as e:
    raise AnnotationError(f"cannot read annotation file {path}: {e}") from None
  except ValueError as e:  # neither JSON nor JSON Lines, or JSON of another shape
    raise AnnotationError(f"{path} is not valid JSON or JSON Lines of annotation records ({e})") from None
  if not raw:
    raise AnnotationError(f"{path} holds no records")
  out = []
  for n, rec in raw:
    where = location(path, unit, n)
    if isinstance(rec, Exception):
      raise AnnotationError(f"{where}: {rec}")
    out.append((where, rec))
  return out


def _get(rec, where: str, key: str, types=None):
  if not isinstance(rec, dict):
    raise AnnotationError(f"{where}: a {type(rec).__name__}, not an object")
  if key not in rec:
    raise AnnotationError(f"{where}: no {key!r} key (it has {sorted(rec)})")
  v = rec[key]
  if types is not None and not isinstance(v, types):
    names = " or ".join(_type_name(t()) for t in (types if isinstance(types, tuple) else (types,)))
    raise AnnotationError(f"{where}: {key!r} must be {names}, not {_type_name(v)} ({json.dumps(v)[:40]})")
  return v


def _str_list(v, where: str, key: str, inner: str | None = None) -> list[str]:
  out = []
  for x in ([v] if isinstance(v, str) else v):
    if inner is not None and isinstance(x, dict):
      x = _get(x, where, inner)  # official VQA answers: [{"answer": ...}]
    if not isinstance(x, str):
      raise AnnotationError(f"{where}: {key!r} must hold strings, found {_type_name(x)} ({json.dumps(x)[:40]})")
    out.append(x)
  if not out:
    raise AnnotationError(f"{where}: {key!r} is an empty list")
  return out


def load_caption_annotations(path: str) -> list[dict]:
  """-> [{"image": relative path, "refs": [caption, ...]}] in file order, one per image (a COCO file's
  images without a caption are left out)."""
  grouped: dict = {}
  for where, rec in _located(path):
    image = _get(rec, where, "image", str)
    caps = _str_list(_get(rec, where, "caption", (str, list)), where, "caption")
    grouped.setdefault(image, []).extend(caps)
  return [{"image": k, "refs": v} for k, v in grouped.items()]


def load_vqa_annotations(path: str) -> list[dict]:
  """-> [{"question_id", "image", "question", "answers": [...]}] in file order; question_id defaults to
  the record's index in the file (from 0)."""
  out = []
  for i, (where, rec) in enumerate(_located(path)):
    image = _get(rec, where, "image", str)
    question = _get(rec, where, "question", str)
    key = "answers" if isinstance(rec, dict) and "answers" in rec else "answer"
    answers = _str_list(_get(rec, where, key, (str, list)), where, key, inner="answer")
    out.append({"question_id": rec.get("question_id", i), "image": image, "question": question,
                "answers": answers})
  return out


def load_retrieval_annotations(path: str) -> list[dict]:
  """-> [{"image": relative path, "captions": [...]}] in file order."""
  out = []
  for where, rec in _located(path):
    image = _get(rec, where, "image", str)
    caps = _str_list(_get(rec, where, "caption", (str, list)), where, "caption")
    out.append({"image": image, "captions": caps})
  return out
