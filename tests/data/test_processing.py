"""blip2_jax.data.processing against transformers 5's BLIP image processor and tokenizers.

HF backend compared: `BlipImageProcessorPil` (transformers/models/blip/image_processing_pil_blip.py),
the PIL / numpy backend. `AutoImageProcessor` and `BlipImageProcessor` pick the torchvision backend
only when torchvision is installed (it is not installable beside the pinned CPU torch) and otherwise
fall back to this one.

Measured (scikit-image's astronaut, chelsea, coffee, rocket, camera, as PNG and JPEG files,
224 and 364 px, RGBA and palette-with-transparency files): max abs diff 0.0 on every image; the
pipeline is bit-equal (same PIL bicubic resize, float64 rescale, float32 normalise).
"""
import json

import numpy as np
import pytest

from blip2_jax.data import processing
from blip2_jax.data.processing import ImageLoadError, ImageProcessor, load_image

try:  # the image tests need Pillow and scikit-image (its sample photographs); the text tests do not
  import skimage.data as skdata
  import transformers.image_utils as hf_image_utils
  from PIL import Image
  HAVE_IMAGES = True
except ImportError:  # pragma: no cover
  HAVE_IMAGES = False
needs_images = pytest.mark.skipif(not HAVE_IMAGES, reason="needs pillow and scikit-image")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def _hf(size=224, **kw):
  from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
  return BlipImageProcessorPil(size={"height": size, "width": size}, **kw)


def _hf_pixels(proc, images):
  x = proc(images, return_tensors="np")["pixel_values"]
  return np.asarray(x).transpose(0, 2, 3, 1)  # NCHW -> NHWC


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("photos")
  out = {}
  for name in PHOTOS:
    im = Image.fromarray(getattr(skdata, name)())
    for ext in ("png", "jpg"):
      p = d / f"{name}.{ext}"
      im.save(p, quality=90) if ext == "jpg" else im.save(p)
      out[f"{name}.{ext}"] = str(p)
  return out


@needs_images
@pytest.mark.parametrize("size", [224, 364])
def test_photos_equal_hf(photo_files, size):
  ours, hf = ImageProcessor(size), _hf(size)
  for name, path in photo_files.items():
    mine = load_image(path)
    ref = hf_image_utils.load_image(path)
    assert np.array_equal(np.asarray(mine), np.asarray(ref)), name
    a, b = ours(mine), _hf_pixels(hf, ref)
    assert a.shape == (1, size, size, 3) and a.dtype == np.float32
    assert np.abs(a - b).max() == 0.0, name  # measured 0.0
  # a batch of paths equals a batch through HF
  paths = list(photo_files.values())
  a = ours(paths)
  b = _hf_pixels(hf, [hf_image_utils.load_image(p) for p in paths])
  assert a.shape == (len(paths), size, size, 3) and np.abs(a - b).max() == 0.0


@needs_images
def test_grayscale(tmp_path):
  p = tmp_path / "camera.png"
  Image.fromarray(skdata.camera()).save(p)  # mode "L"
  assert Image.open(p).mode == "L"
  ours, hf = ImageProcessor(224), _hf(224)
  assert np.abs(ours(str(p)) - _hf_pixels(hf, hf_image_utils.load_image(str(p)))).max() == 0.0
  # un-converted L image and a 2-D uint8 array, as HF gets them
  im = Image.open(p)
  assert np.abs(ours(im) - _hf_pixels(hf, im)).max() == 0.0
  arr = skdata.camera()[..., None]  # (H, W, 1): HF takes no 2-D arrays; we take both
  assert np.abs(ours(arr) - _hf_pixels(hf, arr)).max() == 0.0
  assert np.abs(ours(arr[..., 0]) - ours(arr)).max() == 0.0


def _rgba():
  rgb = skdata.astronaut()
  h, w = rgb.shape[:2]
  alpha = (np.linspace(0, 255, w)[None, :] * np.ones((h, 1))).astype(np.uint8)
  return np.concatenate([rgb, alpha[..., None]], -1)


@needs_images
def test_rgba(tmp_path):
  rgba = _rgba()
  p = tmp_path / "rgba.png"
  Image.fromarray(rgba, "RGBA").save(p)
  ours, hf = ImageProcessor(224), _hf(224)
  # the un-converted PIL RGBA image: both composite the alpha onto white
  im = Image.open(p)
  a, b = ours(im), _hf_pixels(hf, im)
  assert np.abs(a - b).max() == 0.0
  # load_image: HF converts with Image.convert("RGB"), which drops alpha; so do we
  loaded = load_image(p)
  assert loaded.mode == "RGB"
  assert np.array_equal(np.asarray(loaded), np.asarray(hf_image_utils.load_image(str(p))))
  assert np.array_equal(np.asarray(loaded), rgba[..., :3])
  assert np.abs(ours(loaded) - _hf_pixels(hf, hf_image_utils.load_image(str(p)))).max() == 0.0
  assert np.abs(ours(loaded) - a).max() > 0.1  # compositing differs from dropping alpha
  # uint8 (H, W, 4) arrays: HF's numpy branch (float blend, round)
  assert np.abs(ours(rgba) - _hf_pixels(hf, rgba)).max() == 0.0


@needs_images
def test_palette_with_transparency(tmp_path):
  im = Image.fromarray(skdata.chelsea()).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
  im.info["transparency"] = 0
  p = tmp_path / "pal.png"
  im.save(p, transparency=0)
  im = Image.open(p)
  assert im.mode == "P" and im.info.get("transparency") is not None
  assert np.abs(ImageProcessor(224)(im) - _hf_pixels(_hf(224), im)).max() == 0.0


@needs_images
def test_exif_orientation(tmp_path):
  im = Image.fromarray(skdata.chelsea())  # 300 x 451 (H x W)
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise on display
  p = tmp_path / "rot.jpg"
  im.save(p, exif=exif.tobytes())
  mine = load_image(p)
  assert mine.size == (300, 451)  # (W, H) after transpose
  assert np.array_equal(np.asarray(mine), np.asarray(hf_image_utils.load_image(str(p))))


@needs_images
def test_load_errors(tmp_path):
  with pytest.raises(ImageLoadError, match="not found.*nope.jpg"):
    load_image(tmp_path / "nope.jpg")
  with pytest.raises(ImageLoadError, match="not a file"):
    load_image(tmp_path)
  txt = tmp_path / "notes.jpg"
  txt.write_text("this is not a jpeg\n")
  with pytest.raises(ImageLoadError, match=r"notes\.jpg.*not an image"):
    load_image(txt)
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")
  with pytest.raises(ImageLoadError, match="empty.png"):
    load_image(empty)
  good = tmp_path / "good.jpg"
  Image.fromarray(skdata.coffee()).save(good, quality=90)
  data = good.read_bytes()
  cut = tmp_path / "truncated.jpg"
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(ImageLoadError, match=r"truncated\.jpg.*truncated"):
    load_image(cut)
  # the processor raises the same error when given the path
  with pytest.raises(ImageLoadError, match=r"truncated\.jpg"):
    ImageProcessor(224)([str(good), str(cut)])
  with pytest.raises(TypeError, match="uint8"):
    ImageProcessor(224)(np.zeros((8, 8, 3), np.float32))


@needs_images
def test_from_pretrained(tmp_path):
  hf = _hf(364)
  d = tmp_path / "ckpt"
  hf.save_pretrained(str(d))
  proc = ImageProcessor.from_pretrained(d)
  assert proc.size == (364, 364) and proc.resample == 3
  im = Image.fromarray(skdata.rocket())
  assert np.abs(proc(im) - _hf_pixels(hf, im)).max() == 0.0
  # round trip through our to_dict, loaded by transformers
  d2 = tmp_path / "ours"
  d2.mkdir()
  (d2 / "preprocessor_config.json").write_text(json.dumps(proc.to_dict()))
  from transformers import AutoImageProcessor
  back = AutoImageProcessor.from_pretrained(str(d2))
  assert np.abs(proc(im) - _hf_pixels(back, im)).max() == 0.0
  # no preprocessor_config.json: vision_config.image_size from config.json, BLIP defaults
  d3 = tmp_path / "cfg_only"
  d3.mkdir()
  (d3 / "config.json").write_text(json.dumps({"model_type": "blip-2", "vision_config": {"image_size": 96}}))
  p3 = ImageProcessor.from_pretrained(d3)
  assert p3.size == (96, 96) and p3.image_mean == processing.OPENAI_CLIP_MEAN
  assert np.abs(p3(im) - _hf_pixels(_hf(96), im)).max() == 0.0
  with pytest.raises(FileNotFoundError, match="neither"):
    ImageProcessor.from_pretrained(tmp_path / "ours" / "..")  # tmp_path: no configs
  with pytest.raises(FileNotFoundError, match="not a directory"):
    ImageProcessor.from_pretrained(tmp_path / "missing")


# ----------------------------------------------------------------------------------------
# text
# ----------------------------------------------------------------------------------------
CORPUS = ["a photo of a cat sitting on a mat", "Question: what is the man holding? Answer: a red umbrella",
          "Question: how many dogs are there? Short answer: two", "a dog running in the park with a ball"] * 5


def _save_bpe_tokenizer(path, family):
  """A tiny byte-level BPE tokenizer trained here (no hub), with OPT-style (BOS '</s>' first) or
  T5-style (EOS '</s>' last) special tokens, saved as a transformers fast tokenizer."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=["<pad>", "</s>", "<unk>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  eos = tok.token_to_id("</s>")
  single = "</s> $A" if family == "opt" else "$A </s>"
  tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("</s>", eos)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                 bos_token="</s>")
  fast.save_pretrained(str(path))
  return fast


def test_prompts():
  assert processing.CAPTION_PROMPT == "a photo of"
  assert processing.vqa_prompt("what is this?", "opt") == "Question: what is this? Answer:"
  assert processing.vqa_prompt("what is this?", "llama") == "Question: what is this? Answer:"
  assert processing.vqa_prompt(" what is this? ", "t5") == "Question: what is this? Short answer:"
  with pytest.raises(ValueError, match="unknown LLM family"):
    processing.vqa_prompt("q", "gpt2")
  assert processing.padding_side("opt") == "left" and processing.padding_side("t5") == "right"
  assert processing.family_of({"text_config": {"model_type": "opt"}}) == "opt"
  assert processing.family_of({"text_config": {"model_type": "t5"}}) == "t5"
  for family in ("qwen2", "qwen3", "mistral", "gemma2", "gemma3"):  # decoder-only: left, OPT's VQA prompt
    assert processing.padding_side(family) == "left"
    assert processing.vqa_prompt("q", family) == "Question: q Answer:"
  assert processing.family_of({"text_config": {"model_type": "gemma3_text"}}) == "gemma3"


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_tokenize_prompts(tmp_path, family):
  _save_bpe_tokenizer(tmp_path / "tok", family)
  tok = processing.load_tokenizer(tmp_path / "tok")
  prompts = [processing.CAPTION_PROMPT, processing.vqa_prompt("what is the man holding?", family), "a dog"]
  out = processing.tokenize_prompts(tok, prompts, family)
  side = processing.padding_side(family)
  ref = tok(prompts, padding=True, padding_side=side, return_tensors="np")
  assert np.array_equal(out["input_ids"], ref["input_ids"])
  assert np.array_equal(out["attention_mask"], ref["attention_mask"])
  assert out["input_ids"].dtype == np.int32
  eos = tok.convert_tokens_to_ids("</s>")
  assert list(out["attention_mask"].sum(1)) == [len(tok(p)["input_ids"]) for p in prompts]
  m = out["attention_mask"]
  if family == "opt":  # left padding: every row ends with real tokens and starts with BOS '</s>'
    assert m[:, -1].all() and not m[:, 0].all()
    for i in range(len(prompts)):
      assert out["input_ids"][i, m.shape[1] - m[i].sum()] == eos
  else:  # right padding: every row starts with real tokens and ends with EOS '</s>'
    assert m[:, 0].all() and not m[:, -1].all()
    for i in range(len(prompts)):
      assert out["input_ids"][i, m[i].sum() - 1] == eos
  assert tok.padding_side == "right"  # the tokenizer is not modified
  t = m.shape[1]
  wide = processing.tokenize_prompts(tok, prompts, family, pad_to=t + 5)
  assert wide["input_ids"].shape == (3, t + 5) and wide["attention_mask"].sum() == m.sum()
  cut = processing.tokenize_prompts(tok, prompts, family, max_length=3)
  assert cut["input_ids"].shape[1] == 3
  full = tok(prompts[1])["input_ids"]
  assert list(cut["input_ids"][1]) == (full[-3:] if family == "opt" else full[:3])


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    processing.load_tokenizer(tmp_path / "missing")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="no tokenizer files"):
    processing.load_tokenizer(tmp_path)
