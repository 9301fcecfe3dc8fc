"""python -m blip2_jax.retrieve --model DIR --images-dir D --texts file.txt [--k 128]

Scores every image against every text with ITC, re-ranks each image's (and each text's) top k with
the ITM head, and prints the ranked matches both ways. Needs a Blip2ForImageTextRetrieval
checkpoint directory with its (BERT) tokenizer.

Scores: a re-ranked candidate's score is ITM logit + ITC, as LAVIS. With --top above --k the
candidates outside the top k were not re-ranked: they come after the re-ranked ones, in ITC order,
printed with their ITC score and marked "(ITC only, not re-ranked)". In --output, "itc" holds every
pair's ITC score and "i2t" / "t2i" hold -100 for the pairs that were not re-ranked (as LAVIS).

Bad input stops the run before the model loads, with one line on stderr and exit status 2 (a
missing or empty --images-dir or --texts, an --output that cannot be written, a --model directory
that is not a readable Blip2ForImageTextRetrieval checkpoint, --k / --top / --batch-size below 1,
--max-text-len beyond the Q-Former's positions, a flag given twice, a --texts byte that is not UTF-8,
named by line and column). Images in --images-dir that cannot be decoded (or are larger than
--max-image-pixels) are skipped and listed on stderr, and the exit status is then 1 (the others are
still ranked). Features or scores that are not finite (a model with NaN weights) stop the run with
one line, exit status 1, and no rankings. Any other failure: one line, exit status 1 (`--debug`
shows the traceback).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from blip2_jax import inference
from blip2_jax.checkpoints import hf
from blip2_jax.cli import options
from blip2_jax.cli.options import RETRIEVAL_ARCH, Failure, UsageError
from blip2_jax.core.progress import progress_bar
from blip2_jax.data import annotations, processing

NOT_RERANKED = -100.0  # inference.retrieval_scores' i2t / t2i value for pairs outside a top k (LAVIS's)


def read_texts(path: str) -> list[str]:
  """The non-empty lines of --texts, stripped; UsageError when the file is missing, unreadable or empty."""
  options.check_input_file(path, "--texts")
  try:
    texts = [line.strip() for line in annotations.read_utf8(path).splitlines() if line.strip()]
  except annotations.AnnotationError as e:  # FILE:LINE:COLUMN of a byte that is not UTF-8
    raise UsageError(f"--texts {e}") from None
  except OSError as e:
    raise UsageError(f"--texts {path}: cannot read it: {e}") from None
  if not texts:
    raise UsageError(f"--texts {path}: holds no non-empty lines")
  return texts


def load_images(proc, paths: list[str]):
  """-> (pixel values of the readable images, their indices, [(index, reason)] of the unreadable ones)."""

  px, ok, errors = [], [], []
  bar = progress_bar(len(paths), "loading images")
  for i, p in enumerate(paths):
    try:
      px.append(proc.preprocess_one(p))
      ok.append(i)
    except processing.ImageLoadError as e:
      errors.append((i, str(e)))
    bar.update()
  bar.close()
  return (np.stack(px) if px else None), ok, errors


def ranked(reranked_scores, itc_scores, top: int) -> list[tuple[int, float, bool]]:
  """[(candidate, score, re-ranked?)] best first: the re-ranked candidates by ITM + ITC, then the
  others by ITC (their ITM + ITC score was never computed)."""
  done = reranked_scores != NOT_RERANKED
  first = [j for j in np.argsort(-reranked_scores, kind="stable") if done[j]]
  rest = [j for j in np.argsort(-itc_scores, kind="stable") if not done[j]]
  return [(int(j), float(reranked_scores[j]), True) for j in first[:top]] + \
         [(int(j), float(itc_scores[j]), False) for j in rest[:max(0, top - len(first))]]


def print_rankings(title: str, queries: list[str], candidates: list[str], scores, itc, top: int) -> None:
  print(title)
  for q, name in enumerate(queries):
    print(f"{name}:")
    for r, (j, s, reranked) in enumerate(ranked(scores[q], itc[q], min(top, len(candidates)))):
      print(f"  {r + 1}. {s:8.3f}  {candidates[j]}" + ("" if reranked else "  (ITC only, not re-ranked)"))


def parser():
  p = options.Parser(prog="python -m blip2_jax.retrieve", description="\n\n".join(__doc__.split("\n\n")[1:3]))
  options.add_model_arg(p, "a Blip2ForImageTextRetrieval checkpoint directory", required=True)
  p.add_argument("--images-dir", required=True, help="rank every image in this directory (not recursive)")
  p.add_argument("--texts", required=True, help="a text file, one caption per line")
  p.add_argument("--k", type=options.positive_int, default=128,
                 help="how many candidates per query the ITM head re-ranks (default 128)")
  p.add_argument("--top", type=options.positive_int, default=5,
                 help="matches printed per query (default 5); beyond --k they are ITC only, marked so")
  p.add_argument("--batch-size", type=options.positive_int, default=32,
                 help="images / texts / pairs per compiled batch (default 32)")
  p.add_argument("--max-text-len", type=options.positive_int, default=35, help="tokens per text (default 35)")
  p.add_argument("--output", help="write all scores as JSON here (checked before any work)")
  options.add_image_args(p)
  return p


def main(argv=None) -> int:
  return options.run(_main, argv)


def _main(argv) -> int:
  a = parser().parse_args(argv)
  options.apply_image_args(a)
  options.check_output(a.output)
  images = options.list_images(a.images_dir)
  texts = read_texts(a.texts)
  a.model = options.model_dir(a.model, revision=a.revision)
  options.check_checkpoint(a.model, archs=(RETRIEVAL_ARCH,), task="retrieval")
  options.check_text_len(a.model, a.max_text_len)
  tok = options.load_tokenizer(a.model)
  proc = options.load_image_processor(a.model)
  names_all = [os.path.basename(f) for f in images]
  px, ok, errors = load_images(proc, images)
  if px is None:
    options.report_skipped(errors, names_all)
    raise Failure(f"no readable image in --images-dir {a.images_dir}")
  model, params = hf.from_pretrained(a.model)
  if model.config.architecture != RETRIEVAL_ARCH:  # config.json named no architecture
    raise UsageError(f"--model {a.model} is a {model.config.architecture} checkpoint; retrieval needs a "
                     f"{RETRIEVAL_ARCH} one (e.g. Salesforce/blip2-itm-vit-g)")
  enc = tok(texts, padding="max_length", truncation=True, max_length=a.max_text_len, return_tensors="np")
  scores = inference.retrieval_scores(model, params, px, enc["input_ids"], enc["attention_mask"], k=a.k,
                                      batch_size=a.batch_size, progress=True)
  names = [names_all[i] for i in ok]
  print_rankings("image -> text", names, texts, scores["i2t"], scores["itc"], a.top)
  print()
  print_rankings("text -> image", texts, names, scores["t2i"], scores["itc"].T, a.top)
  if a.output:
    options.write_atomic(a.output, json.dumps({"images": names, "texts": texts,
                                               **{k: v.tolist() for k, v in scores.items()}}))
  if errors:
    options.report_skipped(errors, names_all)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
