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

Bad input stops the run before the model loads, with one line on stderr and exit status 2: a
missing IMAGE file, an --images-dir without images, an --output that cannot be written (its
directory missing or read-only, or a directory), a --model directory that is missing, empty, not
a BLIP-2 checkpoint, without weights or tokenizer, or with a truncated model.safetensors. A file
that exists but cannot be decoded (corrupt, truncated, not an image) is skipped: it gets no output
line, every skipped file is listed with its reason on stderr at the end, and the exit status is 1
(the other captions are still printed and written). Any other failure: one line, exit status 1
(`--debug` shows the traceback).
"""
from __future__ import annotations

import json
import os
import sys

from blip2_jax.cli import options
from blip2_jax.cli.options import GENERATION_ARCHS, RETRIEVAL_ARCH, UsageError


def load_generation_checkpoint(model_dir: str, dtype: str = "float32", task: str = "captioning"):
  """-> (model, params, tokenizer, qformer_tokenizer or None, ImageProcessor). The directory, its
  tokenizers and its image processor are checked before the weights load (UsageError naming the problem)."""
  cfg = options.check_checkpoint(model_dir, archs=GENERATION_ARCHS, task=task)
  tok = options.load_tokenizer(model_dir)
  qtok = None
  if cfg.get("model_type") == "instructblip":
    qtok = options.load_tokenizer(os.path.join(model_dir, "qformer_tokenizer"))
  proc = options.load_image_processor(model_dir)
  import jax.numpy as jnp

  import blip2_jax
  model, params = blip2_jax.from_pretrained(model_dir, dtype=jnp.dtype(dtype))
  if not hasattr(model, "get_image_features") or model.config.text is None:  # config.json named no architecture
    raise UsageError(f"--model {model_dir} is a {model.config.architecture} checkpoint, which has no language "
                     f"model; {task} needs a {' or '.join(GENERATION_ARCHS)} checkpoint")
  return model, params, tok, qtok, proc


def add_generation_args(p, defaults: dict) -> None:
  """Generation flags; left unset they take the task's LAVIS defaults for the checkpoint's family."""
  for flag, key, kind in (("--num-beams", "num_beams", options.positive_int),
                          ("--max-new-tokens", "max_new_tokens", options.positive_int),
                          ("--min-new-tokens", "min_new_tokens", options.nonnegative_int)):
    p.add_argument(flag, type=kind, default=None, help=f"default {defaults[key]} (LAVIS)")
  p.add_argument("--batch-size", type=options.positive_int, default=8,
                 help="images per compiled batch (default 8); the last batch is padded")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype of the ViT and the LLM (the Q-Former stays float32)")


def generation_options(a) -> dict:
  """The generation flags the user set (the rest keep the library's per-task defaults)."""
  return {k: getattr(a, k) for k in ("num_beams", "max_new_tokens", "min_new_tokens") if getattr(a, k) is not None}


def check_stage1_checkpoint(model_dir: str, prompt: str | None) -> None:
  """UsageError unless a Blip2ForImageTextRetrieval directory can caption (its Q-Former LM head, no prompt)."""
  if prompt:
    raise UsageError("--prompt: stage-1 (Q-Former) captioning starts from [DEC] and takes no prompt")
  if not os.path.isfile(os.path.join(model_dir, options.QFORMER_HEAD_FILE)):
    raise UsageError(
        f"--model {model_dir}: cannot caption with this stage-1 {RETRIEVAL_ARCH} checkpoint: it has no "
        f"{options.QFORMER_HEAD_FILE} (the Q-Former LM head, which HF's checkpoints do not ship; stage-1 training "
        "writes it, or weights.hf.save_qformer_head)")


def load_stage1_checkpoint(model_dir: str, dtype: str = "float32"):
  """A Blip2ForImageTextRetrieval directory for Q-Former captioning -> (model, params, tokenizer,
  qformer_lm_head, ImageProcessor); the files are checked before the weights load (UsageError)."""
  options.check_checkpoint(model_dir, archs=(RETRIEVAL_ARCH,), task="stage-1 captioning")
  check_stage1_checkpoint(model_dir, None)
  tok = options.load_tokenizer(model_dir)
  proc = options.load_image_processor(model_dir)
  import jax.numpy as jnp

  import blip2_jax
  from blip2_jax.weights import hf as hf_io
  model, params = blip2_jax.from_pretrained(model_dir, dtype=jnp.dtype(dtype))
  head, _ = hf_io.load_qformer_head(model_dir, model)
  return model, params, tok, head, proc


def image_inputs(files, images_dir) -> tuple[list[str], list[str]]:
  """(paths, names) of IMAGE arguments and of the images in --images-dir; UsageError when a file is
  missing or there is no image at all."""
  from blip2_jax.retrieve import list_images
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


def parser():
  from blip2_jax import inference
  p = options.Parser(prog="python -m blip2_jax.caption", description=__doc__.split("\n\n")[1])
  options.add_model_arg(p, "a BLIP-2 / InstructBLIP checkpoint directory with its tokenizer", required=True)
  p.add_argument("images", nargs="*", metavar="IMAGE", help="image files")
  p.add_argument("--images-dir", help="caption every image in this directory too")
  p.add_argument("--prompt", default=None, help='text the caption continues (default "a photo of"; "" for none)')
  p.add_argument("--output", help="also write JSONL {image, caption} lines here (checked before any work)")
  add_generation_args(p, inference.CAPTION_DEFAULTS)
  return p


def main(argv=None) -> int:
  return options.run(_main, argv)


def _main(argv) -> int:
  a = parser().parse_args(argv)
  opts = generation_options(a)
  options.check_output(a.output)
  paths, names = image_inputs(a.images, a.images_dir)
  a.model = options.model_dir(a.model, revision=a.revision)
  cfg = options.check_checkpoint(a.model, archs=GENERATION_ARCHS + (RETRIEVAL_ARCH,), task="captioning")
  if options.architecture(cfg) == RETRIEVAL_ARCH:  # stage 1: the Q-Former's LM head
    check_stage1_checkpoint(a.model, a.prompt)
    model, params, tok, head, proc = load_stage1_checkpoint(a.model, a.dtype)
    kw = dict(qformer_lm_head=head)
  else:
    model, params, tok, qtok, proc = load_generation_checkpoint(a.model, a.dtype, "captioning")
    kw = dict(qformer_tokenizer=qtok, prompt=a.prompt)

  from blip2_jax import inference
  errors: list = []
  caps = inference.caption(model, params, tok, paths, batch_size=a.batch_size, progress=True, processor=proc,
                           errors=errors, **kw, **opts)
  lines = []
  for name, c in zip(names, caps):
    if c is not None:
      print(f"{name}\t{c}", flush=True)
      lines.append(json.dumps({"image": name, "caption": c}) + "\n")
  if a.output:
    options.write_atomic(a.output, "".join(lines))
  if errors:
    report_skipped(errors, names)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
