"""Training / evaluation transforms of BLIP-2, in numpy and PIL (no torch).

Train images follow LAVIS `Blip2ImageTrainProcessor`:
`RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=BICUBIC)`, `RandomHorizontalFlip()`,
`ToTensor()`, `Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)`. `random_resized_crop_params` is
torchvision's `RandomResizedCrop.get_params` step for step (10 attempts, then the centre-crop
fallback), drawing from a `np.random.Generator` instead of torch's global RNG; the crop and the
bicubic resize are PIL's, as torchvision does for PIL inputs. Output: (H, W, 3) float32, NHWC.

Eval images are `processing.ImageProcessor` (HF / LAVIS eval: bicubic resize to (s, s)).

Captions follow LAVIS `BlipCaptionProcessor.pre_caption` (max_words 50).

Images are decoded with `decode_image`, which behaves as `processing.load_image` (EXIF orientation
applied, then RGB); LAVIS itself opens with `Image.open(p).convert("RGB")`, which ignores EXIF
orientation: the two differ only on photographs carrying an EXIF rotation tag.
"""
from __future__ import annotations

import io
import math
import os
import re
import unicodedata

import numpy as np

from blip2_jax.data.processing import (
  OPENAI_CLIP_MEAN,
  OPENAI_CLIP_STD,
  PIL_BICUBIC,
  ImageLoadError,
  _pil,
  decode,
  load_image,
)

CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
MAX_WORDS = 50


# ----------------------------------------------------------------------------------------
# captions
# ----------------------------------------------------------------------------------------
_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = MAX_WORDS) -> str:
  """LAVIS `BlipCaptionProcessor.pre_caption`: lower-case, punctuation .!"()*#:;~ -> space, runs of
  whitespace -> one space, strip trailing newlines and outer spaces, keep the first `max_words` words."""
  caption = _PUNCT.sub(" ", caption.lower())
  caption = _SPACES.sub(" ", caption)
  caption = caption.rstrip("\n").strip(" ")
  words = caption.split(" ")
  if len(words) > max_words:
    caption = " ".join(words[:max_words])
  return caption


def is_blank(text: str) -> bool:
  """True when `text` has no visible character: only spaces, controls and invisible format characters
  (a zero-width space U+200B, a byte-order mark, a zero-width joiner), which `str.strip` keeps."""
  return not any(unicodedata.category(ch)[0] not in "ZC" for ch in text)


def empty_after_cleaning(caption: str, max_words: int = MAX_WORDS) -> bool:
  """True when `pre_caption` leaves nothing to train on: "...", "!!!", "( )", a zero-width space."""
  return is_blank(pre_caption(caption, max_words))


# ----------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------
def pre_question(question: str, max_words: int = MAX_WORDS) -> str:
  """LAVIS `BlipQuestionProcessor.pre_question`: lower-case, drop . ! " ( ) * # : ; ~, <= max_words."""
  question = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
  return " ".join(question.split(" ")[:max_words])


def decode_image(image, name: str | None = None):
  """A record's image -> RGB `PIL.Image`. `image` is a path, encoded bytes, a PIL image or a uint8 array.

  Raises `ImageLoadError` naming the file (or `name`) when it is missing, truncated or not an image.
  """
  PIL = _pil()
  if isinstance(image, (str, os.PathLike)):
    return load_image(image)
  if isinstance(image, PIL.Image.Image):
    return image.convert("RGB")
  if isinstance(image, (bytes, bytearray, memoryview)):
    return decode(io.BytesIO(bytes(image)), name or "<image bytes>")
  a = np.asarray(image)
  if a.dtype != np.uint8 or a.ndim not in (2, 3):
    raise ImageLoadError(f"{name or 'image array'}: expected uint8 (H, W[, C]), got {a.dtype} {a.shape}")
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  return PIL.Image.fromarray(a).convert("RGB")


def random_resized_crop_params(rng: np.random.Generator, height: int, width: int,
                               scale=CROP_SCALE, ratio=CROP_RATIO) -> tuple[int, int, int, int]:
  """torchvision `RandomResizedCrop.get_params` -> (top, left, h, w), with numpy randomness."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      i = int(rng.integers(0, height - h + 1))
      j = int(rng.integers(0, width - w + 1))
      return i, j, h, w
  # fallback to a central crop
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:  # whole image
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def normalize(a: np.ndarray, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 as torchvision ToTensor (x / 255 in float32) + Normalize."""
  x = a.astype(np.float32) / np.float32(255)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def crop_resize_normalize(im, box: tuple[int, int, int, int], size: int, flip: bool = False,
                          mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> np.ndarray:
  """Crops (top, left, h, w), PIL-bicubic resizes to (size, size), optionally mirrors, normalises."""
  PIL = _pil()
  top, left, h, w = box
  im = im.crop((left, top, left + w, top + h)).resize((size, size), resample=PIL_BICUBIC)
  if flip:
    im = im.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
  return normalize(np.asarray(im), mean, std)


def train_image_transform(im, rng: np.random.Generator, size: int, *, scale=CROP_SCALE, ratio=CROP_RATIO,
                          flip_p: float = 0.5, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> np.ndarray:
  """RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize on an RGB PIL image -> (s, s, 3) float32.

  Random draws in torchvision's order: the crop parameters, then the flip coin.
  """
  box = random_resized_crop_params(rng, im.height, im.width, scale, ratio)
  flip = bool(rng.random() < flip_p)
  return crop_resize_normalize(im, box, size, flip, mean, std)
