"""Image-text retrieval recall R@1/5/10, both directions, as LAVIS / ALBEF `report_metrics`.

sim[i, t] is the score of image i against text t (BLIP-2: ITC max-over-queries, optionally
re-ranked with ITM). Each image may have several captions (COCO 5, Flickr30K 5): img2txt[i] lists
its text indices, txt2img[t] is the one image of text t.

- image -> text: rank of image i = the best rank among its captions (0-based: the number of texts
  ranked above its best caption); R@K = % of images with rank < K.
- text -> image: rank of text t = the rank of txt2img[t] among all images for that text.
Ties: LAVIS sorts with np.argsort (order among equal scores unspecified); here a tie counts
against the query (a non-matching item with a score equal to the best match is ranked above it),
so degenerate constant scores give 0, not 100. NaN or infinite scores raise
`core.numerics.NonFiniteError` (NaN compares false, so a NaN matrix would rank every match first).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from blip2_jax.core.numerics import check_finite


def _scores(sim) -> np.ndarray:
  return check_finite(np.asarray(sim, np.float64), "retrieval scores")


def ranks_i2t(sim: np.ndarray, img2txt: Sequence[Sequence[int]]) -> np.ndarray:
  sim = _scores(sim)
  n_img, n_txt = sim.shape
  if len(img2txt) != n_img:
    raise ValueError(f"img2txt has {len(img2txt)} entries for {n_img} images")
  ranks = np.empty(n_img, np.int64)
  for i, gts in enumerate(img2txt):
    gts = np.asarray(list(gts), np.int64)
    if gts.size == 0:
      raise ValueError(f"image {i} has no captions in img2txt")
    if gts.min() < 0 or gts.max() >= n_txt:
      raise ValueError(f"img2txt[{i}] = {gts.tolist()} is out of range for {n_txt} texts")
    row = sim[i]
    best = row[gts].max()
    other = np.ones(n_txt, bool)
    other[gts] = False
    ranks[i] = int(np.count_nonzero(row[other] >= best))
  return ranks


def ranks_t2i(sim: np.ndarray, txt2img: Sequence[int]) -> np.ndarray:
  sim = _scores(sim)
  n_img, n_txt = sim.shape
  txt2img = np.asarray(txt2img, np.int64)
  if txt2img.shape != (n_txt,):
    raise ValueError(f"txt2img has shape {txt2img.shape} for {n_txt} texts")
  if txt2img.min() < 0 or txt2img.max() >= n_img:
    raise ValueError(f"txt2img holds image indices outside [0, {n_img})")
  cols = sim.T  # (n_txt, n_img)
  gt = cols[np.arange(n_txt), txt2img]
  above = np.count_nonzero(cols >= gt[:, None], axis=1) - 1  # minus the match itself
  return above.astype(np.int64)


def retrieval_recall(sim, txt2img: Sequence[int], img2txt: Sequence[Sequence[int]],
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """R@K in percent, LAVIS key names: txt_r{K} (image -> text), img_r{K} (text -> image),
  txt_r_mean, img_r_mean, r_mean. sim: (n_images, n_texts) numpy or jax array."""
  sim = np.asarray(sim)
  if sim.ndim != 2:
    raise ValueError(f"sim must be (n_images, n_texts), got shape {sim.shape}")
  ri, rt = ranks_i2t(sim, img2txt), ranks_t2i(sim, txt2img)
  out = {}
  for k in ks:
    out[f"txt_r{k}"] = 100.0 * float(np.mean(ri < k))
  for k in ks:
    out[f"img_r{k}"] = 100.0 * float(np.mean(rt < k))
  out["txt_r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in ks]))
  out["img_r_mean"] = float(np.mean([out[f"img_r{k}"] for k in ks]))
  out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
  return out


def coco_style_maps(captions_per_image: Sequence[int]) -> tuple[list[int], list[list[int]]]:
  """(txt2img, img2txt) when texts are listed image by image (image i owns the next n_i texts)."""
  txt2img, img2txt, t = [], [], 0
  for i, n in enumerate(captions_per_image):
    img2txt.append(list(range(t, t + n)))
    txt2img.extend([i] * n)
    t += n
  return txt2img, img2txt
