"""Inputs that used to go wrong quietly: 16-bit images saturated to white, Pillow's decompression-bomb
guard (a skip with no way to allow it, or its own two-line warning), annotation image paths that leave
--images-dir, captions empty after cleaning, annotation files with a byte that is not UTF-8."""
import io
import json
import logging
import struct
import warnings
import zlib

import grain
import numpy as np
import PIL.Image
import pytest

from blip2_jax import data
from blip2_jax.data import annotations, processing, transforms

from helpers import png_header

# ----------------------------------------------------------------------------------------
# 16-bit images


def _ramp16(h=24, w=40):
  """A 16-bit grey ramp over the whole range: 0 .. 65535."""
  return np.round(np.linspace(0, 65535, h * w).reshape(h, w)).astype(np.uint16)


def _png16_rgb(a: np.ndarray) -> bytes:
  """A 16-bit RGB PNG written by hand (Pillow writes none): big-endian samples, filter 0 rows."""
  h, w, _ = a.shape
  raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_png_is_scaled_not_saturated(tmp_path):
  a = _ramp16()
  path = tmp_path / "grey16.png"
  PIL.Image.fromarray(a).save(path)  # a real 16-bit greyscale PNG
  with PIL.Image.open(path) as im:
    assert im.mode == "I;16"
    assert np.asarray(im.convert("RGB")).mean() > 250  # what Pillow (and HF's load_image) give: near-white
  got = np.asarray(processing.load_image(path))
  want = np.round(a / 257.0).astype(np.uint8)
  assert got.shape == a.shape + (3,) and (got == want[..., None]).all()
  assert 126 < got.mean() < 129  # the ramp's mean, 127.5
  # the processor sees the same pixels as from the 8-bit file, also for a PIL image handed over directly
  path8 = tmp_path / "grey8.png"
  PIL.Image.fromarray(want).save(path8)
  proc = processing.ImageProcessor(16)
  np.testing.assert_array_equal(proc([str(path)]), proc([str(path8)]))
  with PIL.Image.open(path) as im:
    np.testing.assert_array_equal(proc([im]), proc([str(path8)]))
  # the training decoder (bytes from an ArrayRecord) too
  np.testing.assert_array_equal(np.asarray(transforms.decode_image(path.read_bytes())), got)


@pytest.mark.parametrize("mode, values, want", [
    ("I;16B", np.array([[0, 257, 65535]]), [0, 1, 255]),
    ("I", np.array([[0, 32896, 70000]]), [0, 128, 255]),  # 32-bit integers read as 16-bit data, clipped
    ("F", np.array([[0.0, 0.5, 1.5]]), [0, 128, 255]),  # floats read as 0..1, clipped
])
def test_other_wide_modes(mode, values, want):
  dtype = {"I;16B": ">u2", "I": np.int32, "F": np.float32}[mode]
  im = PIL.Image.fromarray(values.astype(dtype))
  assert im.mode == mode
  out = processing.to_8bit(im)
  assert out.mode == "L" and np.asarray(out).tolist() == [want]


def test_16_bit_rgb_png(tmp_path):
  """Pillow reads a 16-bit RGB PNG as 8-bit RGB (the high bytes): kept as it is."""
  a = np.random.default_rng(0).integers(0, 65536, (6, 5, 3)).astype(np.uint16)
  (tmp_path / "rgb16.png").write_bytes(_png16_rgb(a))
  got = np.asarray(processing.load_image(tmp_path / "rgb16.png"))
  np.testing.assert_array_equal(got, (a >> 8).astype(np.uint8))


# ----------------------------------------------------------------------------------------
# decompression-bomb guard


def test_large_image_refused_with_the_setting_that_allows_it(tmp_path, monkeypatch):
  monkeypatch.setenv(processing.MAX_IMAGE_PIXELS_ENV, "")  # the default; undone after the test
  big = png_header(tmp_path / "big.png", 14000, 14000)
  with pytest.raises(processing.ImageLoadError) as e:
    processing.load_image(big)
  msg = str(e.value)
  assert msg == (f"image {big} is 14000 x 14000 = 196,000,000 pixels, above the limit of 178,956,970 (a guard against "
                 "decompression bombs); allow it with --max-image-pixels 196000000 or "
                 "BLIP2_JAX_MAX_IMAGE_PIXELS=196000000 (0: no limit)")
  # allowed: the size check passes and decoding starts (and fails here on the stub pixel data)
  processing.set_max_image_pixels(196_000_000)
  with pytest.raises(processing.ImageLoadError, match="cannot read image"):
    processing.load_image(big)
  processing.set_max_image_pixels(0)
  assert processing.max_image_pixels() is None
  # a small real image under a small limit
  PIL.Image.new("RGB", (40, 30)).save(tmp_path / "small.png")
  monkeypatch.setenv(processing.MAX_IMAGE_PIXELS_ENV, "1000")
  with pytest.raises(processing.ImageLoadError, match="40 x 30 = 1,200 pixels, above the limit of 1,000"):
    processing.load_image(tmp_path / "small.png")
  monkeypatch.setenv(processing.MAX_IMAGE_PIXELS_ENV, "lots")
  with pytest.raises(ValueError, match="BLIP2_JAX_MAX_IMAGE_PIXELS='lots': expected a number of pixels"):
    processing.max_image_pixels()
  # the annotation check names the setting too (finetune's up-front report)
  monkeypatch.delenv(processing.MAX_IMAGE_PIXELS_ENV)
  probs = annotations.validate_annotations([{"image": "big.png", "caption": "a dog"}], tmp_path, check_images=True)
  assert len(probs) == 1 and "--max-image-pixels 196000000" in probs[0][1]
  assert PIL.Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own guard is left as it was


def test_no_pillow_warning_below_the_limit(tmp_path, monkeypatch):
  """12000 x 12000 is above Pillow's warning threshold: Pillow prints its two-line DecompressionBombWarning;
  ours opens it silently (it is below our limit)."""
  monkeypatch.setenv(processing.MAX_IMAGE_PIXELS_ENV, "")  # the default; undone after the test
  path = png_header(tmp_path / "12k.png", 12000, 12000)
  with pytest.warns(PIL.Image.DecompressionBombWarning):
    PIL.Image.open(path).close()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with processing.open_image(path, "12k.png") as im:
      assert im.size == (12000, 12000)


# ----------------------------------------------------------------------------------------
# annotations: paths outside the images directory, empty captions, bytes that are not UTF-8


def test_image_paths_outside_the_images_dir(tmp_path):
  (tmp_path / "imgs").mkdir()
  PIL.Image.new("RGB", (8, 8)).save(tmp_path / "out.png")
  recs = [{"image": "../out.png", "caption": "a"}, {"image": str(tmp_path / "out.png"), "caption": "b"},
          {"image": "sub/../../out.png", "caption": "c"}, {"image": "ok/../x.png", "caption": "d"}]
  probs = annotations.validate_annotations(recs, tmp_path / "imgs", check_files=False)
  assert [n for n, _ in probs] == [1, 2, 3]
  assert probs[0][1] == (f"image path '../out.png' leads outside the images directory {tmp_path / 'imgs'} (absolute, "
                         "or up with ..); --allow-outside-images-dir reads such paths")
  assert annotations.validate_annotations(recs[:3], tmp_path / "imgs", check_files=False,
                                         allow_outside_images_dir=True) == []
  assert [annotations.leaves_images_dir(p) for p in ("a/b.png", "..", "../a", "/a", "a/../../b", "a/..b")] == \
      [False, True, True, True, True, False]


def test_captions_empty_after_cleaning_are_reported(tmp_path):
  for blank in ("...", "\u200b", " ( ) ", "!!\ufeff"):
    assert transforms.empty_after_cleaning(blank), blank
  assert not transforms.empty_after_cleaning("a dog.")
  PIL.Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
  lines = [{"image": "a.png", "caption": "a dog"}, {"image": "a.png", "caption": "..."},
           {"image": "a.png", "caption": ["a cat", "\u200b"]}]
  (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  probs = annotations.validate_annotations(tmp_path / "t.jsonl", tmp_path)
  assert probs == [(2, '1 caption(s) empty after cleaning ("..."): pre_caption drops . ! " ( ) * # : ; ~ and what '
                       "is left is blank or invisible"),
                   (3, '1 caption(s) empty after cleaning ("\\u200b"): pre_caption drops . ! " ( ) * # : ; ~ and what '
                       "is left is blank or invisible")]


def test_training_skips_and_counts_empty_captions(tmp_path, caplog):
  """Where no up-front check runs (a recipe's data.annotations), the pipeline skips such a record like an
  unreadable image: counted in num_skipped, logged, never trained on."""
  recs = []
  for i in range(4):
    PIL.Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    recs.append({"image": f"{i}.png", "caption": "..." if i == 1 else f"a photo {i}"})
  src = data.AnnotationSource(recs, tmp_path)
  with caplog.at_level(logging.WARNING, logger="blip2_jax.data"):
    batches = list(iter(data.make_train_loader(src, global_batch_size=1, image_size=16, seed=0, shuffle=False,
                                               num_epochs=1, shard_options=grain.sharding.NoSharding())))
  assert [str(b["text"][0]) for b in batches] == ["a photo 0", "a photo 2", "a photo 3"]
  assert sum(int(b["num_skipped"]) for b in batches) == 1
  assert "1.png (record 1): caption '...' is empty after cleaning" in caplog.text


def test_non_utf8_byte_is_named_by_line_and_column(tmp_path):
  path = tmp_path / "a.jsonl"
  path.write_bytes(b'{"image": "a.png", "caption": "x"}\n{"image": "b.png", "caption": "caf\xe9"}\n')
  for read in (annotations.read_annotations, annotations.load_caption_annotations,
               lambda p: annotations.validate_annotations(p, tmp_path)):
    with pytest.raises(annotations.AnnotationError) as e:
      read(path)
    assert str(e.value).startswith(f"{path}:2:35: byte 0xe9 is not UTF-8 (invalid continuation byte")
  # columns count characters, not bytes
  path.write_bytes('{"caption": "é"}'.encode() + b"\xff\n")
  with pytest.raises(annotations.AnnotationError, match=r"a.jsonl:1:17: byte 0xff"):
    annotations.read_utf8(str(path))


def test_decode_keeps_png_round_trip():
  """The 8-bit path is unchanged: RGB and greyscale files decode to their own pixels."""
  a = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
  buf = io.BytesIO()
  PIL.Image.fromarray(a).save(buf, "PNG")
  np.testing.assert_array_equal(np.asarray(processing.decode(io.BytesIO(buf.getvalue()), "x")), a)
