"""python -m blip2_jax.caption --model DIR [IMAGE ...] [--images-dir D] [--prompt TEXT] [--output out.jsonl]

Captions images with a BLIP-2 or InstructBLIP checkpoint and prints `name<TAB>caption` per image,
in input order; a progress bar goes to stderr. With a language model (OPT, FlanT5, LLaMA) the
defaults are LAVIS's COCO caption evaluation: prompt "a photo of", 5 beams, at most 30 and at least
8 new tokens (7 for T5; `--prompt ""` for no prompt). A stage-1 Blip2ForImageTextRetrieval
directory that holds qformer_lm_head.safetensors captions with the Q-Former's own LM head, as
LAVIS Blip2Qformer.generate: no prompt, 3 beams, 9 to 29 new tokens. `--output` also writes JSONL lines
{"image": name, "caption": text}. Names are the paths as given for IMAGE arguments and the paths
relative to --images-dir for the images found there (its files with an image extension, sorted,
not recursive).

Bad images: a file given on the command line that does not exist stops the run before the model
loads. A file that exists but cannot be decoded (corrupt, truncated, not an image) is skipped: it
gets no output line, every skipped file is listed with its reason on stderr at the end, and the
exit status is 1 (the other captions are still printed and written).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

GENERATION_ARCHS = ("Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration")


def checkpoint_architecture(model_dir: str) -> str | None:
  """The `architectures[0]` of DIR/config.json, or None when it cannot be read (from_pretrained says why)."""
  try:
    with open(os.path.join(model_dir, "config.json")) as f:
      return (json.load(f).get("architectures") or [None])[0]
  except (OSError, ValueError, AttributeError):
    return None


def require_generation_checkpoint(model_dir: str, task: str) -> None:
  """SystemExit unless DIR holds a checkpoint with a language model (checked before loading weights)."""
  if not os.path.isdir(model_dir):
    raise SystemExit(f"--model {model_dir} is not a directory")
  arch = checkpoint_architecture(model_dir)
  if arch is not None and arch not in GENERATION_ARCHS:
    raise SystemExit(f"{model_dir} is a {arch} checkpoint, which has no language model; {task} needs a "
                     f"{' or '.join(GENERATION_ARCHS)} checkpoint (e.g. Salesforce/blip2-opt-2.7b)")


def load_generation_checkpoint(model_dir: str, dtype: str = "float32", task: str = "captioning"):
  """-> (model, params, tokenizer, qformer_tokenizer or None, ImageProcessor); SystemExit with a
  clear message for a directory that is not a generation checkpoint or lacks its tokenizer."""
  require_generation_checkpoint(model_dir, task)
  import jax.numpy as jnp

  import blip2_jax
  from blip2_jax import processing
  model, params = blip2_jax.from_pretrained(model_dir, dtype=jnp.dtype(dtype))
  if not hasattr(model, "get_image_features") or model.config.text is None:
    raise SystemExit(f"{model_dir} is a {model.config.architecture} checkpoint, which has no language model; "
                     f"{task} needs a {' or '.join(GENERATION_ARCHS)} checkpoint")
  try:
    tok = processing.load_tokenizer(model_dir)
    qtok = None
    if model.config.instruct:
      qtok = processing.load_tokenizer(os.path.join(model_dir, "qformer_tokenizer"))
  except FileNotFoundError as e:
    raise SystemExit(str(e)) from e
  proc = processing.ImageProcessor.from_pretrained(model_dir)
  return model, params, tok, qtok, proc


def add_generation_args(p: argparse.ArgumentParser, defaults: dict) -> None:
  """Generation flags; left unset they take the task's LAVIS defaults for the checkpoint's family."""
  for flag, key in (("--num-beams", "num_beams"), ("--max-new-tokens", "max_new_tokens"),
                    ("--min-new-tokens", "min_new_tokens")):
    p.add_argument(flag, type=int, default=None, help=f"default {defaults[key]} (LAVIS)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype of the ViT and the LLM (the Q-Former stays float32)")


def generation_options(a) -> dict:
  """The generation flags the user set (the rest keep the library's per-task defaults)."""
  if a.batch_size < 1:
    raise SystemExit("--batch-size must be at least 1")
  for name in ("num_beams", "max_new_tokens"):
    if getattr(a, name) is not None and getattr(a, name) < 1:
      raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
  if a.min_new_tokens is not None and a.min_new_tokens < 0:
    raise SystemExit("--min-new-tokens must be at least 0")
  return {k: getattr(a, k) for k in ("num_beams", "max_new_tokens", "min_new_tokens") if getattr(a, k) is not None}


def load_stage1_checkpoint(model_dir: str, dtype: str = "float32"):
  """A Blip2ForImageTextRetrieval directory for Q-Former captioning -> (model, params, tokenizer,
  qformer_lm_head, ImageProcessor); SystemExit when its qformer_lm_head.safetensors or tokenizer is missing."""
  import jax.numpy as jnp

  import blip2_jax
  from blip2_jax import processing
  from blip2_jax.weights import hf as hf_io
  model, params = blip2_jax.from_pretrained(model_dir, dtype=jnp.dtype(dtype))
  try:
    head, _ = hf_io.load_qformer_head(model_dir, model)
    tok = processing.load_tokenizer(model_dir)
  except FileNotFoundError as e:
    raise SystemExit(f"cannot caption with {model_dir} (a stage-1 Blip2ForImageTextRetrieval checkpoint): {e}") from e
  return model, params, tok, head, processing.ImageProcessor.from_pretrained(model_dir)


def main(argv=None) -> int:
  from blip2_jax import inference
  from blip2_jax.retrieve import list_images
  p = argparse.ArgumentParser(prog="python -m blip2_jax.caption", description=__doc__.split("\n\n")[1])
  p.add_argument("--model", required=True, help="a BLIP-2 / InstructBLIP checkpoint directory with its tokenizer")
  p.add_argument("images", nargs="*", metavar="IMAGE", help="image files")
  p.add_argument("--images-dir", help="caption every image in this directory too")
  p.add_argument("--prompt", default=None, help='text the caption continues (default "a photo of"; "" for none)')
  p.add_argument("--output", help="also write JSONL {image, caption} lines here")
  add_generation_args(p, inference.CAPTION_DEFAULTS)
  a = p.parse_args(argv)
  opts = generation_options(a)

  paths, names = [], []
  for f in a.images:
    if not os.path.exists(f):
      raise SystemExit(f"image file not found: {f}")
    paths.append(f)
    names.append(f)
  if a.images_dir:
    for f in list_images(a.images_dir):
      paths.append(f)
      names.append(os.path.relpath(f, a.images_dir))
  if not paths:
    raise SystemExit("no images: give IMAGE files and/or --images-dir")

  if checkpoint_architecture(a.model) == "Blip2ForImageTextRetrieval":  # stage 1: the Q-Former's LM head
    if a.prompt:
      raise SystemExit("--prompt: stage-1 (Q-Former) captioning starts from [DEC] and takes no prompt")
    model, params, tok, head, proc = load_stage1_checkpoint(a.model, a.dtype)
    kw = dict(qformer_lm_head=head)
  else:
    model, params, tok, qtok, proc = load_generation_checkpoint(a.model, a.dtype, "captioning")
    kw = dict(qformer_tokenizer=qtok, prompt=a.prompt)
  errors: list = []
  caps = inference.caption(model, params, tok, paths, batch_size=a.batch_size, progress=True, processor=proc,
                           errors=errors, **kw, **opts)
  out = open(a.output, "w") if a.output else None
  try:
    for name, c in zip(names, caps):
      if c is None:
        continue
      print(f"{name}\t{c}", flush=True)
      if out:
        out.write(json.dumps({"image": name, "caption": c}) + "\n")
  finally:
    if out:
      out.close()
  if errors:
    print(f"skipped {len(errors)} unreadable image(s):", file=sys.stderr)
    for i, msg in errors:
      print(f"  {names[i]}: {msg}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
