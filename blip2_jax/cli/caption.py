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
a BLIP-2 checkpoint, without weights or tokenizer, or with a truncated model.safetensors, a flag
given twice, --min-new-tokens above --max-new-tokens, or queries + prompt + --max-new-tokens past
the LLM's positions (OPT / LLaMA max_position_embeddings; the numbers are named). NaN or infinite
logits (a model with NaN weights) stop the run with one line and exit status 1. An image above
--max-image-pixels (default 178,956,970) is skipped with the setting that allows it named. A file
that exists but cannot be decoded (corrupt, truncated, not an image) is skipped: it gets no output
line, every skipped file is listed with its reason on stderr at the end, and the exit status is 1
(the other captions are still printed and written). Any other failure: one line, exit status 1
(`--debug` shows the traceback).
"""
from __future__ import annotations

import json
import os
import sys

import jax.numpy as jnp

from blip2_jax import inference
from blip2_jax.checkpoints import hf
from blip2_jax.cli import options
from blip2_jax.cli.options import GENERATION_ARCHS, RETRIEVAL_ARCH, UsageError
from blip2_jax.decoding import qformer as qformer_decoding


def check_stage1_checkpoint(model_dir: str, prompt: str | None) -> None:
  """UsageError unless a Blip2ForImageTextRetrieval directory can caption (its Q-Former LM head, no prompt)."""
  if prompt:
    raise UsageError("--prompt: stage-1 (Q-Former) captioning starts from [DEC] and takes no prompt")
  if not os.path.isfile(os.path.join(model_dir, options.QFORMER_HEAD_FILE)):
    raise UsageError(
        f"--model {model_dir}: cannot caption with this stage-1 {RETRIEVAL_ARCH} checkpoint: it has no "
        f"{options.QFORMER_HEAD_FILE} (the Q-Former LM head, which HF's checkpoints do not ship; stage-1 training "
        "writes it, or checkpoints.hf.save_qformer_head)")


def load_stage1_checkpoint(model_dir: str, dtype: str = "float32"):
  """A Blip2ForImageTextRetrieval directory for Q-Former captioning -> (model, params, tokenizer,
  qformer_lm_head, ImageProcessor); the files are checked before the weights load (UsageError)."""
  options.check_checkpoint(model_dir, archs=(RETRIEVAL_ARCH,), task="stage-1 captioning")
  check_stage1_checkpoint(model_dir, None)
  tok = options.load_tokenizer(model_dir)
  proc = options.load_image_processor(model_dir)
  model, params = hf.from_pretrained(model_dir, dtype=jnp.dtype(dtype))
  head, _ = hf.load_qformer_head(model_dir, model)
  return model, params, tok, head, proc


def parser():
  p = options.Parser(prog="python -m blip2_jax.caption", description=__doc__.split("\n\n")[1])
  options.add_model_arg(p, "a BLIP-2 / InstructBLIP checkpoint directory with its tokenizer", required=True)
  p.add_argument("images", nargs="*", metavar="IMAGE", help="image files")
  p.add_argument("--images-dir", help="caption every image in this directory too")
  p.add_argument("--prompt", default=None, help='text the caption continues (default "a photo of"; "" for none)')
  p.add_argument("--output", help="also write JSONL {image, caption} lines here (checked before any work)")
  options.add_generation_args(p, inference.CAPTION_DEFAULTS)
  options.add_image_args(p)
  return p


def main(argv=None) -> int:
  return options.run(_main, argv)


def _main(argv) -> int:
  a = parser().parse_args(argv)
  opts = options.generation_options(a)
  options.apply_image_args(a)
  options.check_output(a.output)
  paths, names = options.image_inputs(a.images, a.images_dir)
  a.model = options.model_dir(a.model, revision=a.revision)
  cfg = options.check_checkpoint(a.model, archs=GENERATION_ARCHS + (RETRIEVAL_ARCH,), task="captioning")
  if options.architecture(cfg) == RETRIEVAL_ARCH:  # stage 1: the Q-Former's LM head
    check_stage1_checkpoint(a.model, a.prompt)
    try:  # the options and the Q-Former's positions, before the weights load
      qformer_decoding.checked_options(options.model_config(a.model), **opts)
    except ValueError as e:
      raise UsageError(str(e)) from None
    model, params, tok, head, proc = load_stage1_checkpoint(a.model, a.dtype)
    kw = dict(qformer_lm_head=head)
  else:
    prompts = inference.caption_prompts(1, a.prompt)
    model, params, tok, qtok, proc = options.load_generation_checkpoint(
        a.model, a.dtype, "captioning", check=lambda c, t, q: inference.check_generation(
            c, t, prompts, "caption", qformer_tokenizer=q, **opts))
    kw = dict(qformer_tokenizer=qtok, prompt=a.prompt)

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
    options.report_skipped(errors, names)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
