"""python -m blip2_jax.vqa --model DIR --image IMG --question "..." [--question "..." ...]

Zero-shot visual question answering with a BLIP-2 or InstructBLIP checkpoint: each question is
wrapped in the BLIP-2 prompt ("Question: {} Answer:" for OPT / LLaMA, "Question: {} Short answer:"
for FlanT5) and answered with LAVIS's settings (5 beams, at most 10 new tokens, length_penalty -1).
Prints `question<TAB>answer` per question, in order. InstructBLIP
checkpoints also feed the prompt to the Q-Former (tokenizer from DIR/qformer_tokenizer).
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
  from blip2_jax import inference, processing
  from blip2_jax.caption import add_generation_args, generation_options, load_generation_checkpoint
  p = argparse.ArgumentParser(prog="python -m blip2_jax.vqa", description=__doc__.split("\n\n")[1])
  p.add_argument("--model", required=True, help="a BLIP-2 / InstructBLIP checkpoint directory with its tokenizer")
  p.add_argument("--image", required=True)
  p.add_argument("--question", required=True, action="append", help="repeat for several questions")
  p.add_argument("--length-penalty", type=float, default=inference.VQA_DEFAULTS["length_penalty"])
  p.add_argument("--prompt-template", default=None,
                 help='override the prompt, with {} for the question (e.g. "Question: {} Short answer:")')
  p.add_argument("--output", help="also write JSONL {image, question, answer} lines here")
  add_generation_args(p, inference.VQA_DEFAULTS)
  a = p.parse_args(argv)
  opts = generation_options(a)
  if a.prompt_template is not None and a.prompt_template.count("{}") != 1:
    raise SystemExit("--prompt-template must contain exactly one {} (where the question goes)")
  questions = [q.strip() for q in a.question]
  if not all(questions):
    raise SystemExit("--question must not be empty")
  try:
    image = processing.load_image(a.image)
  except processing.ImageLoadError as e:
    raise SystemExit(str(e)) from e
  model, params, tok, qtok, proc = load_generation_checkpoint(a.model, a.dtype, "VQA")
  answers = inference.answer(model, params, tok, [image], questions, batch_size=a.batch_size, progress=True,
                             qformer_tokenizer=qtok, processor=proc, prompt_template=a.prompt_template,
                             length_penalty=a.length_penalty, **opts)
  for q, ans in zip(questions, answers):
    print(f"{q}\t{ans}", flush=True)
  if a.output:
    with open(a.output, "w") as f:
      for q, ans in zip(questions, answers):
        f.write(json.dumps({"image": a.image, "question": q, "answer": ans}) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
