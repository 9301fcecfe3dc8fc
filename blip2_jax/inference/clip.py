"""CLIP image-text similarity, CapFilt's ranking step: BLIP-2 scored each image's web text and its
synthetic captions by the cosine similarity of a CLIP ViT-L/14's image and text embeddings and kept
the top two.

    model, params = blip2_jax.from_pretrained("openai/clip-vit-large-patch14")   # or a directory
    tokenizer = processing.load_tokenizer(clip_dir)
    pixel_values = processing.ImageProcessor.from_pretrained(clip_dir)(images)  # CLIP's resize + crop
    scores = clip_scores(model, params, tokenizer, pixel_values, [[web_text, *captions], ...])
    best = np.argsort(-scores[0])[:2]          # image 0's two best texts

`ImageProcessor.from_pretrained` of a CLIP directory does CLIP's preprocessing (the shorter side to 224
with PIL bicubic, the centred 224 x 224 window, OpenAI CLIP mean / std). Texts are tokenised with the
checkpoint's CLIP tokenizer (BOS text EOS), truncated to the model's max_position_embeddings (77 for
the OpenAI models: CLIP's context) and padded to it, so every text batch has one shape.

Scores are cosines in [-1, 1], HF's `logits_per_image / logit_scale.exp()`: no temperature, so the
scores of different images compare (a CapFilt threshold means the same everywhere). Each image's
embedding is computed once, however many texts it has; images and texts run in fixed-size batches
(the last one padded, `batching.map_batched`), so each function compiles once per model and batch size.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from blip2_jax.core import xla
from blip2_jax.inference.batching import map_batched
from blip2_jax.models import clip


@functools.lru_cache(maxsize=8)
def _fns(model):
  def image(params, px):
    return model.apply({"params": params}, px, method="image_features")[1]

  def text(params, ids, mask):
    return model.apply({"params": params}, ids, mask, method="text_features")[1]

  opts = xla.CPU_NO_LIBRARY_FUSIONS
  return xla.jit(image, opts), xla.jit(text, opts)


def _check(model) -> None:
  if not isinstance(model, clip.CLIPModel):
    raise TypeError(f"CLIP scoring needs a CLIPModel (blip2_jax.from_pretrained of a CLIP directory); "
                    f"got {type(model).__name__}")


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids, attention_mask), int32 (N, max_length): CLIP's BOS text EOS, truncated and padded
  to `max_length` (the tokenizer keeps EOS when it truncates)."""
  enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length)
  return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


def image_embeds(model, params, pixel_values, *, batch_size: int = 16, progress: bool = False) -> np.ndarray:
  """(N, projection_dim) float32 L2-normalised image embeddings of NHWC CLIP pixel values."""
  _check(model)
  image_fn, _ = _fns(model)
  (out,) = map_batched(lambda px: image_fn(params, px), [np.asarray(pixel_values, np.float32)], batch_size,
                       "CLIP images", progress)
  return out


def text_embeds(model, params, tokenizer, texts: Sequence[str], *, batch_size: int = 64,
                progress: bool = False) -> np.ndarray:
  """(M, projection_dim) float32 L2-normalised text embeddings (see `tokenize`)."""
  _check(model)
  if not texts:
    return np.zeros((0, model.config.projection_dim), np.float32)
  _, text_fn = _fns(model)
  ids, mask = tokenize(tokenizer, texts, model.config.text.max_position_embeddings)
  (out,) = map_batched(lambda i, m: text_fn(params, i, m), [ids, mask], batch_size, "CLIP texts", progress)
  return out


def clip_scores(model, params, tokenizer, pixel_values, texts_per_image: Sequence[Sequence[str]], *,
                batch_size: int = 16, text_batch_size: int = 64, progress: bool = False) -> list[np.ndarray]:
  """Cosine similarity of every image with each of its own texts.

  pixel_values: (N, H, W, 3) float32 from the CLIP checkpoint's `ImageProcessor`; texts_per_image:
  N lists of strings (any lengths, empty ones included). Returns N float32 arrays, the i-th of
  len(texts_per_image[i]): cos(image i, text j) = HF CLIPModel's logits_per_image[i, j] / exp(logit_scale).
  Images run `batch_size` at a time, texts `text_batch_size` at a time.
  """
  _check(model)
  if len(texts_per_image) != len(pixel_values):
    raise ValueError(f"{len(pixel_values)} images but {len(texts_per_image)} lists of texts")
  counts = [len(t) for t in texts_per_image]
  if not counts:
    return []
  img = image_embeds(model, params, pixel_values, batch_size=batch_size, progress=progress)
  txt = text_embeds(model, params, tokenizer, [t for ts in texts_per_image for t in ts],
                    batch_size=text_batch_size, progress=progress)
  owner = np.repeat(np.arange(len(counts)), counts)
  sims = np.einsum("me,me->m", img[owner], txt).astype(np.float32)
  return np.split(sims, np.cumsum(counts)[:-1])
