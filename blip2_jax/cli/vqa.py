"""python -m blip2_jax.vqa --model DIR --image IMG --question "..." [--question "..." ...]

Zero-shot visual question answering with a BLIP-2 or InstructBLIP checkpoint: each question is
wrapped in the BLIP-2 prompt ("Question: {} Answer:" for OPT / LLaMA, "Question: {} Short answer:"
for FlanT5) and answered with LAVIS's settings (5 beams, at most 10 new tokens, length_penalty -1).
Prints `question<TAB>answer` per question, in order. InstructBLIP
checkpoints also feed the prompt to the Q-Former (tokenizer from DIR/qformer_tokenizer).

One image a run: --image given twice is refused (`python -m blip2_jax.evaluate --task vqa` answers
questions about many images). Bad input stops the run before the model loads, with one line on
stderr and exit status 2 (a missing or unreadable --image, an empty --question, an --output that
cannot be written, a --model directory that is not a readable BLIP-2 / InstructBLIP checkpoint
with a language model, another flag given twice, a non-finite --length-penalty, --min-new-tokens above
--max-new-tokens, queries + prompt + new tokens past the LLM's positions). NaN logits: one line, exit 1. Any other failure: one line, exit status 1 (`--debug` shows the traceback).
"""
from __future__ import annotations

import json
import sys

from blip2_jax import inference
from blip2_jax.cli import options
from blip2_jax.cli.options import UsageError
from blip2_jax.data import processing


def parser():
  p = options.Parser(prog="python -m blip2_jax.vqa", description=__doc__.split("\n\n")[1])
  options.add_model_arg(p, "a BLIP-2 / InstructBLIP checkpoint directory with its tokenizer", required=True)
  p.add_argument("--image", required=True, action="append",
                 help="the image file the questions are about (one a run)")
  p.add_argument("--question", required=True, action="append", help="repeat for several questions")
  p.add_argument("--length-penalty", type=options.finite_float, default=inference.VQA_DEFAULTS["length_penalty"],
                 help=f"beam search length penalty (default {inference.VQA_DEFAULTS['length_penalty']}, LAVIS)")
  p.add_argument("--prompt-template", default=None,
                 help='override the prompt, with {} for the question (e.g. "Question: {} Short answer:")')
  p.add_argument("--output", help="also write JSONL {image, question, answer} lines here (checked before any work)")
  options.add_generation_args(p, inference.VQA_DEFAULTS)
  options.add_image_args(p)
  return p


def main(argv=None) -> int:
  return options.run(_main, argv)


def _main(argv) -> int:
  a = parser().parse_args(argv)
  opts = options.generation_options(a)
  options.apply_image_args(a)
  if len(a.image) > 1:
    raise UsageError(f"--image given {len(a.image)} times ({', '.join(a.image)}): vqa answers questions about "
                     "one image; run it once per image, or use python -m blip2_jax.evaluate --task vqa")
  image_path = a.image[0]
  if a.prompt_template is not None and a.prompt_template.count("{}") != 1:
    raise UsageError("--prompt-template must contain exactly one {} (where the question goes)")
  questions = [q.strip() for q in a.question]
  if not all(questions):
    raise UsageError("--question must not be empty")
  options.check_output(a.output)
  try:
    image = processing.load_image(image_path)
  except processing.ImageLoadError as e:
    raise UsageError(f"--image: {e}") from None
  a.model = options.model_dir(a.model, revision=a.revision)
  model, params, tok, qtok, proc = options.load_generation_checkpoint(
      a.model, a.dtype, "VQA", check=lambda c, t, q: inference.check_generation(
          c, t, inference.vqa_prompts(c, questions, a.prompt_template), "vqa", qformer_tokenizer=q,
          length_penalty=a.length_penalty, **opts))
  answers = inference.answer(model, params, tok, [image], questions, batch_size=a.batch_size, progress=True,
                             qformer_tokenizer=qtok, processor=proc, prompt_template=a.prompt_template,
                             length_penalty=a.length_penalty, **opts)
  for q, ans in zip(questions, answers):
    print(f"{q}\t{ans}", flush=True)
  if a.output:
    options.write_atomic(a.output, "".join(json.dumps({"image": image_path, "question": q, "answer": ans}) + "\n"
                                           for q, ans in zip(questions, answers)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
