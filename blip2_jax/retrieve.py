"""python -m blip2_jax.retrieve --model DIR --images-dir D --texts file.txt [--k 128]

Scores every image against every text with ITC, re-ranks each image's (and each text's) top k with
the ITM head, and prints the ranked matches both ways. Needs a Blip2ForImageTextRetrieval
checkpoint directory with its (BERT) tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_images(images_dir: str) -> list[str]:
  if not os.path.isdir(images_dir):
    raise SystemExit(f"--images-dir {images_dir} is not a directory")
  files = sorted(os.path.join(images_dir, f) for f in os.listdir(images_dir)
                 if f.lower().endswith(IMAGE_EXTS))
  if not files:
    raise SystemExit(f"--images-dir {images_dir} holds no images ({', '.join(IMAGE_EXTS)})")
  return files


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m blip2_jax.retrieve", description=__doc__.split("\n\n")[1])
  p.add_argument("--model", required=True, help="a Blip2ForImageTextRetrieval checkpoint directory")
  p.add_argument("--images-dir", required=True)
  p.add_argument("--texts", required=True, help="a text file, one caption per line")
  p.add_argument("--k", type=int, default=128, help="how many candidates the ITM head re-ranks")
  p.add_argument("--top", type=int, default=5, help="matches printed per query")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--max-text-len", type=int, default=35)
  p.add_argument("--output", help="write all scores as JSON here")
  a = p.parse_args(argv)

  import blip2_jax
  from blip2_jax import inference, processing
  model, params = blip2_jax.from_pretrained(a.model)
  if model.config.architecture != "Blip2ForImageTextRetrieval":
    raise SystemExit(f"{a.model} is a {model.config.architecture} checkpoint; retrieval needs a "
                     "Blip2ForImageTextRetrieval one (e.g. Salesforce/blip2-itm-vit-g)")
  images = list_images(a.images_dir)
  if not os.path.isfile(a.texts):
    raise SystemExit(f"--texts {a.texts} does not exist")
  with open(a.texts) as f:
    texts = [line.strip() for line in f if line.strip()]
  if not texts:
    raise SystemExit(f"--texts {a.texts} holds no non-empty lines")
  proc = processing.ImageProcessor.from_pretrained(a.model)
  tok = processing.load_tokenizer(a.model)
  px = proc(images)
  enc = tok(texts, padding="max_length", truncation=True, max_length=a.max_text_len, return_tensors="np")
  scores = inference.retrieval_scores(model, params, px, enc["input_ids"], enc["attention_mask"], k=a.k,
                                      batch_size=a.batch_size, progress=True)
  names = [os.path.basename(f) for f in images]
  top = min(a.top, len(texts))
  print("image -> text")
  for i, name in enumerate(names):
    order = scores["i2t"][i].argsort()[::-1][:top]
    print(f"{name}:")
    for r, j in enumerate(order):
      print(f"  {r + 1}. {scores['i2t'][i, j]:8.3f}  {texts[j]}")
  print("\ntext -> image")
  top = min(a.top, len(images))
  for j, text in enumerate(texts):
    order = scores["t2i"][j].argsort()[::-1][:top]
    print(f"{text}:")
    for r, i in enumerate(order):
      print(f"  {r + 1}. {scores['t2i'][j, i]:8.3f}  {names[i]}")
  if a.output:
    with open(a.output, "w") as f:
      json.dump({"images": names, "texts": texts, **{k: v.tolist() for k, v in scores.items()}}, f)
  return 0


if __name__ == "__main__":
  sys.exit(main())
