"""python -m blip2_jax.evaluate --task {caption,vqa,retrieval} --model DIR --annotations FILE --images-dir D

Runs a checkpoint over an evaluation set the way LAVIS evaluates BLIP-2, prints the metrics
(`name<TAB>value`) and, with `--output results.json`, writes {"task", "model", "annotations",
"n", "metrics", "predictions"}. Image paths in the annotations are relative to --images-dir.
`--limit N` keeps the first N images (caption, retrieval) or questions (vqa).

Annotation formats (JSON, or JSON Lines: one record per line):
- caption (BLEU-1..4 and CIDEr-D, `evaluate_captions`; needs a BLIP-2 / InstructBLIP checkpoint):
  * LAVIS `coco_karpathy_test.json`: [{"image": "val2014/x.jpg", "caption": ["ref", ...]}, ...]
    (records whose "caption" is one string, as in the train split, are grouped by image);
  * COCO `captions_*.json`: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}
    (images without a caption are left out).
  Captions use the LAVIS settings (prompt "a photo of", 5 beams, 8-30 new tokens).
- vqa (VQAv2 accuracy, `vqa_accuracy`; BLIP-2 / InstructBLIP checkpoint):
  * LAVIS `vqav2` style: [{"image", "question", "answer": [10 human answers], "question_id"}, ...]
  * JSONL / JSON list of {"image", "question", "answers"}; answers may also be the official
    [{"answer": ...}, ...] dicts; question_id is optional (default: the record's index, from 0).
  Questions go through LAVIS's question processor (lower-cased, . ! " ( ) * # : ; ~ removed), then
  the BLIP-2 prompt; 5 beams, 1-10 new tokens, length_penalty -1.
- retrieval (R@1/5/10 both ways, `retrieval_recall`; Blip2ForImageTextRetrieval checkpoint):
  * LAVIS `coco_karpathy_test.json` / `flickr30k_test.json`: [{"image", "caption": [5 captions]}, ...]
  Captions go through LAVIS's caption processor (lower-cased, . ! " ( ) * # : ; ~ to spaces, at
  most 50 words) and are tokenised to 35 tokens; ITC scores all pairs, the ITM head re-ranks each
  image's and each text's top --k (128), and recall uses the re-ranked i2t scores for image -> text
  (txt_r*) and t2i for text -> image (img_r*), as LAVIS.

Bad input stops the run before the model loads, with one line on stderr and exit status 2: a task
the checkpoint cannot do, a --model directory that is not a readable checkpoint, an unreadable
annotation file (a byte that is not UTF-8 is named "FILE:LINE:COLUMN"), a record missing a key or
holding the wrong type (named by where it is: "FILE:N" for line N of a JSON Lines file, "FILE: record
N" for the N-th record of a JSON list; both count from 1), image files the annotations name that are
missing, an image path that leads outside --images-dir (absolute, or up with ..; --allow-outside-images-dir
reads them), an --output that cannot be written, a flag given twice, --min-new-tokens above
--max-new-tokens or a generation past the LLM's positions. An image that exists but cannot be
decoded (or is larger than --max-image-pixels) stops the run when it is reached (one line naming the
file, exit status 1); so do scores, features or logits that are not finite (a model with NaN weights:
no metric is printed) and any other failure (`--debug` shows the traceback).

From Python: the metrics are `blip2_jax.evaluation` (evaluate_captions, vqa_accuracy, retrieval_recall),
the annotation readers `blip2_jax.data.annotations` (load_caption_annotations, load_vqa_annotations,
load_retrieval_annotations).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from blip2_jax import inference
from blip2_jax.checkpoints import hf
from blip2_jax.cli import options
from blip2_jax.cli.options import GENERATION_ARCHS, RETRIEVAL_ARCH, UsageError
from blip2_jax.core.progress import progress_bar
from blip2_jax.data.annotations import (
  AnnotationError,
  load_caption_annotations,
  load_retrieval_annotations,
  load_vqa_annotations,
  outside_report,
)
from blip2_jax.data.transforms import pre_caption, pre_question
from blip2_jax.evaluation import coco_style_maps, evaluate_captions, retrieval_recall, vqa_accuracy
from blip2_jax.evaluation.retrieval import ranks_i2t, ranks_t2i

TASKS = ("caption", "vqa", "retrieval")


def _image_paths(images_dir: str, rel: list[str], allow_outside: bool = False) -> list[str]:
  outside = None if allow_outside else outside_report(rel, images_dir)
  if outside:
    raise UsageError(f"--annotations: {outside}")
  paths = [os.path.join(images_dir, r) for r in rel]
  missing = sorted({p for p in paths if not os.path.isfile(p)})
  if missing:
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise UsageError(f"{len(missing)} image file(s) of the annotations not found under --images-dir "
                     f"{images_dir}: {', '.join(missing[:5])}{more}")
  return paths


# ----------------------------------------------------------------------------------------
# the tasks


def _run_caption(a, records, paths):
  opts = options.generation_options(a)
  model, params, tok, qtok, proc = options.load_generation_checkpoint(
      a.model, a.dtype, "caption evaluation", check=lambda c, t, q: inference.check_generation(
          c, t, inference.caption_prompts(1, None), "caption", qformer_tokenizer=q, **opts))
  caps = inference.caption(model, params, tok, paths, batch_size=a.batch_size, progress=True,
                           qformer_tokenizer=qtok, processor=proc, **opts)
  metrics = evaluate_captions(caps, [r["refs"] for r in records])
  preds = [{"image": r["image"], "caption": c} for r, c in zip(records, caps)]
  return metrics, preds


def _run_vqa(a, records, paths):
  opts = options.generation_options(a)
  questions = [pre_question(r["question"]) for r in records]
  model, params, tok, qtok, proc = options.load_generation_checkpoint(
      a.model, a.dtype, "VQA evaluation", check=lambda c, t, q: inference.check_generation(
          c, t, inference.vqa_prompts(c, questions), "vqa", qformer_tokenizer=q, **opts))
  answers = inference.answer(model, params, tok, paths, questions, batch_size=a.batch_size, progress=True,
                             qformer_tokenizer=qtok, processor=proc, **opts)
  acc, per = vqa_accuracy(answers, [r["answers"] for r in records], return_per_question=True)
  preds = [{"question_id": r["question_id"], "image": r["image"], "question": r["question"], "answer": ans,
            "accuracy": s} for r, ans, s in zip(records, answers, per)]
  return {"accuracy": acc}, preds


def _run_retrieval(a, records, paths):
  tok = options.load_tokenizer(a.model)
  proc = options.load_image_processor(a.model)
  model, params = hf.from_pretrained(a.model)
  if not hasattr(model, "itm_logits"):  # config.json named no architecture
    raise UsageError(f"--model {a.model} is a {model.config.architecture} checkpoint; retrieval needs a "
                     f"{RETRIEVAL_ARCH} one (e.g. Salesforce/blip2-itm-vit-g)")
  px = []
  with progress_bar(len(paths), "loading images") as bar:  # an unreadable image stops the run: one line
    for p in paths:
      px.append(proc.preprocess_one(p))
      bar.update()
  texts = [pre_caption(c) for r in records for c in r["captions"]]
  txt2img, img2txt = coco_style_maps([len(r["captions"]) for r in records])
  enc = tok(texts, padding="max_length", truncation=True, max_length=a.max_text_len, return_tensors="np")
  scores = inference.retrieval_scores(model, params, np.stack(px), enc["input_ids"], enc["attention_mask"],
                                      k=a.k, batch_size=a.batch_size, progress=True)
  metrics = retrieval_metrics(scores["i2t"], scores["t2i"], txt2img, img2txt)
  ri, rt = ranks_i2t(scores["i2t"], img2txt), ranks_t2i(scores["t2i"].T, txt2img)
  top = min(10, len(texts))
  preds = {
      "images": [{"image": r["image"], "texts": img2txt[i], "rank": int(ri[i]),
                  "top_texts": np.argsort(-scores["i2t"][i], kind="stable")[:top].tolist()}
                 for i, r in enumerate(records)],
      "texts": [{"text": t, "image": txt2img[j], "rank": int(rt[j]),
                 "top_images": np.argsort(-scores["t2i"][j], kind="stable")[:min(10, len(records))].tolist()}
                for j, t in enumerate(texts)],
  }
  return metrics, preds


def retrieval_metrics(i2t, t2i, txt2img, img2txt) -> dict[str, float]:
  """LAVIS `report_metrics` with separate scores: image -> text recall (txt_r*) from i2t (I, T),
  text -> image recall (img_r*) from t2i (T, I)."""
  a = retrieval_recall(i2t, txt2img, img2txt)
  b = retrieval_recall(np.asarray(t2i).T, txt2img, img2txt)
  out = {k: v for k, v in a.items() if k.startswith("txt_")}
  out.update({k: v for k, v in b.items() if k.startswith("img_")})
  out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
  return out


def parser():
  p = options.Parser(prog="python -m blip2_jax.evaluate", description="\n\n".join(__doc__.split("\n\n")[1:4]),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--task", required=True, choices=TASKS)
  options.add_model_arg(p, "checkpoint directory with its tokenizer", required=True)
  p.add_argument("--annotations", required=True, help="annotation file (formats above)")
  p.add_argument("--images-dir", required=True, help="image paths in the annotations are relative to it")
  p.add_argument("--batch-size", type=options.positive_int, default=None,
                 help="images (retrieval: also texts and pairs) per compiled batch; default 8 (caption, vqa), "
                      "32 (retrieval)")
  p.add_argument("--limit", type=options.positive_int, default=None, help="only the first N images / questions")
  p.add_argument("--output", help="write metrics and per-item predictions as JSON here (checked before any work)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="caption / vqa")
  g = p.add_argument_group("caption / vqa generation (default: LAVIS's settings for the task)")
  g.add_argument("--num-beams", type=options.positive_int)
  g.add_argument("--max-new-tokens", type=options.positive_int)
  g.add_argument("--min-new-tokens", type=options.nonnegative_int)
  r = p.add_argument_group("retrieval")
  r.add_argument("--k", type=options.positive_int, default=128, help="candidates the ITM head re-ranks per query")
  r.add_argument("--max-text-len", type=options.positive_int, default=35, help="tokens per caption (default 35)")
  options.add_image_args(p, annotations_dir=True)
  return p


def main(argv=None) -> int:
  return options.run(_main, argv)


def _main(argv) -> int:
  a = parser().parse_args(argv)
  options.apply_image_args(a)
  if a.batch_size is None:
    a.batch_size = 32 if a.task == "retrieval" else 8
  # cheap checks first: output, checkpoint, annotations, image files; then load the weights
  options.check_output(a.output)
  model_arg, a.model = a.model, options.model_dir(a.model, revision=a.revision)
  archs = (RETRIEVAL_ARCH,) if a.task == "retrieval" else GENERATION_ARCHS
  options.check_checkpoint(a.model, archs=archs, task=f"{a.task} evaluation")
  if a.task == "retrieval":
    options.check_text_len(a.model, a.max_text_len)
  options.check_input_dir(a.images_dir, "--images-dir")
  loader = {"caption": load_caption_annotations, "vqa": load_vqa_annotations,
            "retrieval": load_retrieval_annotations}[a.task]
  try:
    records = loader(a.annotations)
  except AnnotationError as e:
    raise UsageError(f"--annotations: {e}") from None
  if a.limit is not None:
    records = records[: a.limit]
  paths = _image_paths(a.images_dir, [r["image"] for r in records], a.allow_outside_images_dir)

  run = {"caption": _run_caption, "vqa": _run_vqa, "retrieval": _run_retrieval}[a.task]
  metrics, preds = run(a, records, paths)
  for k, v in metrics.items():
    print(f"{k}\t{v:.4f}")
  if a.output:
    options.write_atomic(a.output, json.dumps({"task": a.task, "model": model_arg, "annotations": a.annotations,
                                               "n": len(records), "metrics": metrics, "predictions": preds},
                                              indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
