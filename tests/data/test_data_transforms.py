"""Caption cleaning (LAVIS pre_caption) and the train image transform (torchvision RandomResizedCrop)."""
import math
import re

import numpy as np
import PIL.Image
import pytest

from blip2_jax.data import transforms as T
from blip2_jax.data.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def lavis_pre_caption(caption, max_words=50):
  """LAVIS 1.0.2 lavis/processors/blip_processors.py BlipCaptionProcessor.pre_caption, verbatim."""
  caption = re.sub(
      r"([.!\"()*#:;~])",
      " ",
      caption.lower(),
  )
  caption = re.sub(
      r"\s{2,}",
      " ",
      caption,
  )
  caption = caption.rstrip("\n")
  caption = caption.strip(" ")

  # truncate caption
  caption_words = caption.split(" ")
  if len(caption_words) > max_words:
    caption = " ".join(caption_words[: max_words])

  return caption


TRICKY = [
    "A Man riding a Horse.",
    "  Two dogs!!! playing (in) the *snow*  \n",
    'He said: "hello"; ok~ #tag',
    "tabs\tand\nnewlines\n\n",
    "trailing newline after space \n",
    "single\ttab",
    "ÄÖÜ Straße CAFÉ.",
    "...",
    "",
    "comma, dash - and 'quote' stay",
    " ".join(f"W{i}." for i in range(70)),
    "a  b   c" + " x" * 60 + "\n",
]


@pytest.mark.parametrize("s", TRICKY)
def test_pre_caption_matches_lavis(s):
  assert T.pre_caption(s) == lavis_pre_caption(s)
  assert T.pre_caption(s, max_words=5) == lavis_pre_caption(s, max_words=5)


def test_pre_caption_truncates_to_50_words():
  out = T.pre_caption(" ".join(f"Word{i}" for i in range(80)))
  assert out.split(" ") == [f"word{i}" for i in range(50)]


@pytest.mark.parametrize("hw", [(100, 100), (60, 200), (300, 40), (7, 9)])
def test_crop_params_statistics(hw):
  h, w = hw
  rng = np.random.default_rng(0)
  fallback = 0
  for _ in range(400):
    i, j, ch, cw = T.random_resized_crop_params(rng, h, w)
    assert 0 <= i and 0 <= j and i + ch <= h and j + cw <= w and ch > 0 and cw > 0
    # w, h are rounded from the drawn area / aspect: allow +-0.5 pixel
    in_range = ((cw + 0.5) * (ch + 0.5) >= 0.5 * h * w and (cw - 0.5) * (ch - 0.5) <= h * w
                and (cw + 0.5) / (ch - 0.5) >= 3 / 4 and (cw - 0.5) / (ch + 0.5) <= 4 / 3)
    if not in_range:
      fallback += 1  # the centre-crop fallback: after 10 failed attempts only
      assert (i, j) == ((h - ch) // 2, (w - cw) // 2)
  if hw == (100, 100):
    assert fallback == 0


def test_crop_params_fallback_is_torchvision_centre_crop():
  class NeverFits:  # draws that never fit: scale 1, extreme aspect -> w > width or h > height
    def uniform(self, lo, hi):
      return hi

    def integers(self, lo, hi):
      raise AssertionError("no attempt should fit")

  # very wide image (in_ratio > 4/3): h = height, w = round(h * 4/3), centred
  rng = NeverFits()
  assert T.random_resized_crop_params(rng, 30, 300, scale=(1.0, 1.0)) == (0, (300 - 40) // 2, 30, 40)
  # very tall image: w = width, h = round(w / (3/4))
  assert T.random_resized_crop_params(rng, 300, 30, scale=(1.0, 1.0), ratio=(3 / 4, 4 / 3))[2:] in [(40, 30)]


def test_crop_draw_order_matches_torchvision_algorithm():
  """Re-derives the box from the same generator stream, written out as torchvision's get_params."""
  h, w = 120, 90
  rng = np.random.default_rng(5)
  box = T.random_resized_crop_params(np.random.default_rng(5), h, w)
  for _ in range(10):
    target = h * w * rng.uniform(0.5, 1.0)
    ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
    if 0 < cw <= w and 0 < ch <= h:
      i, j = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      break
  assert box == (i, j, ch, cw)


def _photo(h=64, w=80, seed=0):
  r = np.random.default_rng(seed)
  a = (np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * 0.5 + r.integers(0, 128, (h, w, 3)))
  return PIL.Image.fromarray(a.astype(np.uint8))


@pytest.mark.parametrize("flip", [False, True])
def test_crop_resize_normalise_against_hand_pil(flip):
  im, box, s = _photo(), (5, 7, 40, 50), 32
  got = T.crop_resize_normalize(im, box, s, flip)
  ref = im.crop((7, 5, 57, 45)).resize((s, s), PIL.Image.Resampling.BICUBIC)
  if flip:
    ref = ref.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
  ref = np.asarray(ref, np.float32) / 255.0
  ref = (ref - np.float32(OPENAI_CLIP_MEAN)) / np.float32(OPENAI_CLIP_STD)
  assert got.dtype == np.float32 and got.shape == (s, s, 3)
  np.testing.assert_array_equal(got, ref.astype(np.float32))


def test_train_transform_deterministic_and_flips():
  im = _photo()
  a = T.train_image_transform(im, np.random.default_rng(3), 24)
  b = T.train_image_transform(im, np.random.default_rng(3), 24)
  np.testing.assert_array_equal(a, b)
  flips = 0
  for seed in range(40):
    rng = np.random.default_rng(seed)
    box = T.random_resized_crop_params(rng, im.height, im.width)
    flip = rng.random() < 0.5
    flips += flip
    np.testing.assert_array_equal(T.train_image_transform(im, np.random.default_rng(seed), 24),
                                  T.crop_resize_normalize(im, box, 24, flip))
  assert 8 < flips < 32


def test_decode_image_errors_name_the_file(tmp_path):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  with pytest.raises(T.ImageLoadError, match="bad.jpg"):
    T.decode_image(str(bad))
  with pytest.raises(T.ImageLoadError, match="missing.png"):
    T.decode_image(str(tmp_path / "missing.png"))
  with pytest.raises(T.ImageLoadError, match="shard rec"):
    T.decode_image(b"garbage", name="shard rec")
  arr = np.zeros((4, 5, 3), np.uint8)
  assert T.decode_image(arr).size == (5, 4)
