"""Image and text preprocessing for BLIP-2 / InstructBLIP inference, equal to Hugging Face's.

Images: `ImageProcessor` is the numpy / PIL twin of transformers 5's `BlipImageProcessorPil` (the
backend `AutoImageProcessor` and `BlipImageProcessor` fall back to when torchvision is not
installed): convert to RGB (alpha composited onto white), PIL bicubic resize to the model's square
size, rescale by 1/255 (in float64, then float32), normalise with the OpenAI CLIP mean / std in
float32. It returns NHWC float32 numpy arrays (our models take NHWC); HF returns the same numbers in
NCHW. `tests/data/test_processing.py` checks they are bit-equal on real photographs. With
`shortest_edge` it is the twin of `CLIPImageProcessorPil` instead (CLIP, the CapFilt ranker): the
shorter side resized to `shortest_edge` (bicubic, aspect ratio kept, the longer side truncated to an
int as HF does), then the centred `size` window; `tests/models/test_clip.py` checks it.

    proc = ImageProcessor.from_pretrained("blip2-opt-2.7b")   # preprocessor_config.json or config.json
    pixel_values = proc([load_image("cat.jpg"), load_image("dog.png")])   # (2, 224, 224, 3) float32
    clip_proc = ImageProcessor(224, shortest_edge=224)   # CLIP: short side to 224, centre crop 224

Text: `load_tokenizer(dir)` (transformers `AutoTokenizer` from the checkpoint directory, never the
hub), the prompts of the paper / LAVIS (`CAPTION_PROMPT`, `vqa_prompt`), and `tokenize_prompts`,
which pads on the left for the decoder-only LLMs (OPT, LLaMA, Qwen2 / 3, Mistral, Gemma 2 / 3:
generation continues from the last position of every row) and on the right for T5 (the encoder is
bidirectional and masked).
"""
from __future__ import annotations

import json
import os
import threading
from typing import Iterable, Sequence

import numpy as np

from blip2_jax.core import hub
from blip2_jax.models import registry

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, HF's PILImageResampling.BICUBIC

FAMILIES = tuple(registry.FAMILIES)
DECODER_ONLY = tuple(n for n, f in registry.FAMILIES.items() if not f.encoder_decoder)

CAPTION_PROMPT = "a photo of"
# BLIP-2's zero-shot VQA prompts: FlanT5's, and OPT's for every decoder-only LLM
VQA_TEMPLATES = {f: "Question: {} Short answer:" if f == "t5" else "Question: {} Answer:" for f in FAMILIES}


class ImageLoadError(ValueError):
  """An image file is missing, unreadable or not an image; the message names the file."""


# Pillow's decompression-bomb guard warns (two lines, its own) above Image.MAX_IMAGE_PIXELS (89,478,485)
# and refuses above twice that, with no setting of ours to allow a large image. `open_image` replaces it
# with one limit: images up to MAX_IMAGE_PIXELS_DEFAULT pixels (what Pillow decodes) open silently,
# larger ones are refused naming the image and the setting that allows them.
MAX_IMAGE_PIXELS_ENV = "BLIP2_JAX_MAX_IMAGE_PIXELS"
MAX_IMAGE_PIXELS_DEFAULT = 2 * 89_478_485
_PIL_GUARD = threading.Lock()  # open_image turns Pillow's global guard off for the header read only


def max_image_pixels() -> int | None:
  """The most pixels an image may have (None: no limit): $BLIP2_JAX_MAX_IMAGE_PIXELS (0 for none; the
  commands' --max-image-pixels sets it, so data-loading workers see it too), else
  MAX_IMAGE_PIXELS_DEFAULT. ValueError for a value that is not an integer >= 0."""
  text = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
  if not text:
    return MAX_IMAGE_PIXELS_DEFAULT
  try:
    n = int(text.replace("_", ""))
  except ValueError:
    n = -1
  if n < 0:
    raise ValueError(f"{MAX_IMAGE_PIXELS_ENV}={text!r}: expected a number of pixels (an integer >= 0; 0: no limit)")
  return n or None


def set_max_image_pixels(n: int | None) -> None:
  """Sets the limit of `max_image_pixels` for this process and its children (None or 0: no limit)."""
  os.environ[MAX_IMAGE_PIXELS_ENV] = str(int(n or 0))


def open_image(src, label: str):
  """`PIL.Image.open(src)` (the header only; pixels load later) under `max_image_pixels` instead of
  Pillow's guard: ImageLoadError naming `label`, its size and the setting when it is larger."""
  PIL = _pil()
  limit = max_image_pixels()
  with _PIL_GUARD:
    saved, PIL.Image.MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS, None
    try:
      im = PIL.Image.open(src)
    finally:
      PIL.Image.MAX_IMAGE_PIXELS = saved
  w, h = im.size
  if limit is not None and w * h > limit:
    im.close()
    raise ImageLoadError(f"image {label} is {w} x {h} = {w * h:,} pixels, above the limit of {limit:,} (a guard "
                         f"against decompression bombs); allow it with --max-image-pixels {w * h} or "
                         f"{MAX_IMAGE_PIXELS_ENV}={w * h} (0: no limit)")
  return im


def to_8bit(im):
  """A PIL image of 16-bit or 32-bit samples as an 8-bit one ("L"), scaled, not clipped: Pillow's
  convert("L" / "RGB") clips them at 255, which turns a 16-bit photograph near-white. Modes I;16* (16-bit
  PNG / TIFF) and I (32-bit integers, read as 16-bit data, as Pillow gives older 16-bit files): / 257;
  F (floats, taken as 0..1): x 255. Other modes (16-bit RGB PNGs already come as 8-bit "RGB") unchanged."""
  PIL = _pil()
  if not (im.mode.startswith("I") or im.mode == "F"):
    return im
  a = np.asarray(im)
  if im.mode == "F":
    a = np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0
  else:
    a = np.clip(a.astype(np.float64), 0, 65535) / 257.0
  return PIL.Image.fromarray(np.round(a).astype(np.uint8), mode="L")


# ----------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------
def _pil():
  try:
    import PIL.Image
    import PIL.ImageOps
  except ImportError as e:  # pragma: no cover - pillow is a runtime requirement
    raise ImportError("image preprocessing needs Pillow: pip install pillow") from e
  return PIL


def load_image(path: str | os.PathLike):
  """Opens an image file as an RGB `PIL.Image`, as `transformers.image_utils.load_image` does.

  HF (v5) opens the file, applies the EXIF orientation (`ImageOps.exif_transpose`) and converts
  to RGB with `Image.convert("RGB")`: for RGBA / LA / palette-with-transparency files that DROPS
  the alpha channel (the colour under transparent pixels is kept), unlike the image processor,
  which composites alpha onto white when it is given the un-converted image. We do the same.
  The file is decoded fully here, so a truncated or corrupt file fails now, naming the file;
  URLs and base64 strings (which HF also accepts) are not supported: pass a local path.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ImageLoadError(f"image file not found: {path}")
  if not os.path.isfile(path):
    raise ImageLoadError(f"not a file: {path}")
  return decode(path, path)


def decode(src, label: str):
  """Opens `src` (a path or a binary file object) fully as an RGB `PIL.Image` (EXIF orientation
  applied; 16-bit and float samples scaled to 8 bits by `to_8bit`, where HF's convert("RGB") clips
  them); any decoding failure, or more pixels than `max_image_pixels`, becomes an ImageLoadError
  naming `label`."""
  PIL = _pil()
  try:
    with open_image(src, label) as im:
      im.load()  # decode now: truncated / corrupt data raises here, not later in resize
      im = PIL.ImageOps.exif_transpose(im)
      return to_8bit(im).convert("RGB")
  except ImageLoadError:
    raise
  except PIL.UnidentifiedImageError as e:
    raise ImageLoadError(f"{label} is not an image file Pillow can identify ({e})") from e
  except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise ImageLoadError(f"cannot read image {label}: {type(e).__name__}: {e}") from e


def _to_rgb_uint8(image) -> np.ndarray:
  """HF `convert_to_rgb(image, return_numpy=True)`: (H, W, 3) uint8, alpha composited onto white."""
  PIL = _pil()
  if isinstance(image, (str, os.PathLike)):
    image = load_image(image)
  if isinstance(image, PIL.Image.Image):
    image = to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      image = image.convert("RGBA")
      white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
      image = PIL.Image.alpha_composite(white, image)
    return np.asarray(image.convert("RGB"))
  a = np.asarray(image)
  if a.dtype != np.uint8:
    raise TypeError(f"array images must be uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {a.dtype}")
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise ValueError(f"array images must be channels-last (H, W, C) with C in 1, 3, 4; got shape {a.shape}")
  if a.shape[-1] == 1:
    return np.repeat(a, 3, axis=-1)
  if a.shape[-1] == 4:  # HF's numpy branch: blend in float64 onto 255, round
    alpha = a[..., 3:4] / 255
    return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return a


def _shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
  """HF `get_resize_output_image_size(default_to_square=False)`: the shorter side becomes
  `shortest_edge`, the longer int(shortest_edge * long / short)."""
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(shortest_edge * long / short)
  return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """HF `center_crop` of an (H, W, C) array: the centred (h, w) window; an image smaller than the
  window is first zero-padded around (HF's rounding of both offsets)."""
  (ch, cw), (h, w) = size, a.shape[:2]
  top, left = (h - ch) // 2, (w - cw) // 2
  if top >= 0 and left >= 0:
    return a[top:top + ch, left:left + cw]
  nh, nw = max(ch, h), max(cw, w)
  pad_top, pad_left = -(-(nh - h) // 2), -(-(nw - w) // 2)
  out = np.zeros((nh, nw) + a.shape[2:], a.dtype)
  out[pad_top:pad_top + h, pad_left:pad_left + w] = a
  top, left = top + pad_top, left + pad_left
  return out[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


class ImageProcessor:
  """numpy / PIL equal of HF `BlipImageProcessor(Pil)`: RGB, bicubic resize, 1/255, CLIP mean / std;
  with `shortest_edge`, of `CLIPImageProcessor(Pil)`: the shorter side resized to it, then the centred
  `size` window (`size` is always the output's (H, W)).

  Call it on one image or a list (PIL images, paths, or uint8 (H, W[, C]) arrays); returns float32
  (B, H, W, 3).
  """

  def __init__(self, size: int | tuple[int, int] = 224, *, image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
               image_std: Sequence[float] = OPENAI_CLIP_STD, resample: int = PIL_BICUBIC,
               rescale_factor: float = 1 / 255, do_resize: bool = True, do_rescale: bool = True,
               do_normalize: bool = True, do_convert_rgb: bool = True, shortest_edge: int | None = None):
    self.size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    self.shortest_edge = None if shortest_edge is None else int(shortest_edge)
    self.image_mean = tuple(float(m) for m in image_mean)
    self.image_std = tuple(float(s) for s in image_std)
    self.resample = int(resample)
    self.rescale_factor = float(rescale_factor)
    self.do_resize, self.do_rescale, self.do_normalize = do_resize, do_rescale, do_normalize
    self.do_convert_rgb = do_convert_rgb

  def __repr__(self):
    edge = "" if self.shortest_edge is None else f"shortest_edge={self.shortest_edge}, "
    return (f"ImageProcessor(size={self.size}, {edge}resample={self.resample}, mean={self.image_mean}, "
            f"std={self.image_std})")

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *, revision: str | None = None) -> "ImageProcessor":
    """From `preprocessor_config.json` (HF layout) when the directory has one, else from
    `config.json`: the vision tower's `image_size` (224 when absent) with the BLIP-2 defaults.
    `path` may be a Hugging Face Hub id (blip2_jax.core.hub)."""
    path = hub.resolve(path, revision=revision)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path} is not a directory (expected a BLIP-2 checkpoint directory)")
    pp = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pp):
      with open(pp) as f:
        cfg = json.load(f)
      cfg = cfg.get("image_processor", cfg)  # processor_config.json-style nesting
      return cls.from_dict(cfg, source=pp)
    cj = os.path.join(path, "config.json")
    if not os.path.isfile(cj):
      raise FileNotFoundError(f"{path} has neither preprocessor_config.json nor config.json")
    with open(cj) as f:
      cfg = json.load(f)
    size = int((cfg.get("vision_config") or {}).get("image_size", 224))
    return cls(size=size, shortest_edge=size if cfg.get("model_type") == "clip" else None)

  @classmethod
  def from_dict(cls, cfg: dict, source: str = "config") -> "ImageProcessor":
    kind = str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "")
    clip = kind.startswith("CLIP")  # CLIP's class defaults differ, and it reads an int size as the short side
    size = cfg.get("size", {"shortest_edge": 224} if clip else 384)  # the class defaults
    if clip and isinstance(size, int):
      size = {"shortest_edge": size}
    kw = {k: cfg[k] for k in ("image_mean", "image_std", "resample", "rescale_factor", "do_resize",
                              "do_rescale", "do_normalize", "do_convert_rgb") if cfg.get(k) is not None}
    if isinstance(size, dict) and "shortest_edge" in size and len(size) == 1:
      if not cfg.get("do_center_crop", clip) or cfg.get("do_pad"):
        raise ValueError(f"{source}: a shortest_edge resize is supported with do_center_crop only (CLIP)")
      kw["shortest_edge"], size = size["shortest_edge"], cfg.get("crop_size", 224)
    elif cfg.get("do_center_crop") or cfg.get("do_pad"):
      raise ValueError(f"{source}: do_center_crop / do_pad go with a shortest_edge size only (CLIP)")
    if isinstance(size, dict):
      if "height" in size and "width" in size:
        size = (size["height"], size["width"])
      else:
        raise ValueError(f"{source}: size {size} is not supported (BLIP resizes to height x width)")
    elif isinstance(size, (list, tuple)):
      size = tuple(size)
    return cls(size=size, **kw)

  def to_dict(self) -> dict:
    """The HF `preprocessor_config.json` fields (loads with `AutoImageProcessor`)."""
    hw = {"height": self.size[0], "width": self.size[1]}
    if self.shortest_edge is None:
      kind = dict(image_processor_type="BlipImageProcessor", processor_class="Blip2Processor", size=hw)
    else:
      kind = dict(image_processor_type="CLIPImageProcessor", processor_class="CLIPProcessor",
                  size={"shortest_edge": self.shortest_edge}, crop_size=hw, do_center_crop=True)
    return dict(kind, resample=self.resample, image_mean=list(self.image_mean), image_std=list(self.image_std),
                rescale_factor=self.rescale_factor, do_resize=self.do_resize, do_rescale=self.do_rescale,
                do_normalize=self.do_normalize, do_convert_rgb=self.do_convert_rgb)

  def preprocess_one(self, image) -> np.ndarray:
    """One image -> (H, W, 3) float32."""
    PIL = _pil()
    if self.do_convert_rgb:
      a = _to_rgb_uint8(image)
    else:
      a = np.asarray(load_image(image) if isinstance(image, (str, os.PathLike)) else image)
    if self.do_resize:
      h, w = self.size if self.shortest_edge is None else _shortest_edge_size(*a.shape[:2], self.shortest_edge)
      im = PIL.Image.fromarray(a)
      a = np.asarray(im.resize((w, h), resample=self.resample))
      if a.ndim == 2:
        a = a[..., None]
    if self.shortest_edge is not None:
      a = center_crop(a, self.size)
    x = a
    if self.do_rescale:  # HF: upcast to float64, multiply, then float32
      x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
    if self.do_normalize:  # HF: in the image dtype (float32), mean / std as float32 arrays
      x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
      x = (x - np.asarray(self.image_mean, x.dtype)) / np.asarray(self.image_std, x.dtype)
    return np.asarray(x, np.float32)

  def __call__(self, images) -> np.ndarray:
    single = not isinstance(images, (list, tuple))
    images = [images] if single else list(images)
    if not images:
      raise ValueError("no images given")
    return np.stack([self.preprocess_one(im) for im in images])


# ----------------------------------------------------------------------------------------
# text
# ----------------------------------------------------------------------------------------
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                    "vocab.txt", "merges.txt", "sentencepiece.bpe.model")


def load_tokenizer(path: str | os.PathLike, *, revision: str | None = None, **kwargs):
  """The LLM tokenizer saved in a checkpoint directory (`AutoTokenizer.from_pretrained(path)`, local only;
  a Hugging Face Hub id is resolved to its cached snapshot first, see blip2_jax.core.hub).

  Raises FileNotFoundError naming the directory when it holds no tokenizer files.
  """
  path = hub.resolve(path, revision=revision)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory not found: {path}")
  present = [f for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
  if not present:
    raise FileNotFoundError(
        f"{path} holds no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)}); save the tokenizer "
        "with the checkpoint (tokenizer.save_pretrained(dir)) or pass the directory that has it")
  from transformers import AutoTokenizer
  kwargs.setdefault("local_files_only", True)
  return AutoTokenizer.from_pretrained(path, **kwargs)


def _check_family(family: str) -> str:
  f = family.lower()
  if f not in FAMILIES:
    raise ValueError(f"unknown LLM family {family!r}; choose from {FAMILIES}")
  return f


def family_of(config: dict | str | os.PathLike) -> str:
  """The LLM family ('opt', 't5', 'llama', 'qwen2', ...) of a BLIP-2 config dict or checkpoint
  directory (text_config.model_type)."""
  if not isinstance(config, dict):
    with open(os.path.join(os.fspath(config), "config.json")) as f:
      config = json.load(f)
  mt = (config.get("text_config") or {}).get("model_type")
  return registry.family_of_model_type(mt).name


def vqa_prompt(question: str, family: str) -> str:
  """'Question: {q} Answer:' (decoder-only LLMs) or 'Question: {q} Short answer:' (FlanT5), as BLIP-2
  zero-shot VQA."""
  return VQA_TEMPLATES[_check_family(family)].format(question.strip())


def padding_side(family: str) -> str:
  """'left' for decoder-only LLMs, 'right' for T5."""
  return "left" if _check_family(family) in DECODER_ONLY else "right"


def chat_prompt(tokenizer, text: str) -> str:
  """`text` as one user turn of the tokenizer's chat template, ending with the assistant's turn
  opening (`add_generation_prompt`), for instruction-tuned LLMs (Qwen2.5-Instruct, Gemma IT, ...);
  `text` unchanged when the tokenizer has no chat template. A BOS the template writes is dropped:
  tokenising with special tokens adds it back, once."""
  if not getattr(tokenizer, "chat_template", None):
    return text
  out = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                      add_generation_prompt=True)
  bos = tokenizer.bos_token
  return out[len(bos):] if bos and out.startswith(bos) else out


def tokenize_prompts(tokenizer, prompts: str | Iterable[str], family: str, *, max_length: int | None = None,
                     pad_to: int | None = None, dtype=np.int32, chat_template: bool = False) -> dict[str, np.ndarray]:
  """Tokenises a batch of prompts with the tokenizer's special tokens (the decoder-only LLMs' BOS
  where their tokenizer adds one, T5's EOS) and pads them: on the LEFT for the decoder-only LLMs,
  on the RIGHT for T5.

  Returns {"input_ids", "attention_mask"}: numpy (B, T) `dtype`, T the longest row (or `pad_to`,
  which must be at least that). `max_length` truncates each row to that many tokens: from the left
  for decoder-only models (keeping the end of the prompt, where generation continues), from the
  right for T5. The pad id is the tokenizer's pad token (else its EOS, else 0); padded positions
  have mask 0, so their id never matters. The tokenizer itself is not modified. `chat_template`:
  each prompt goes through `chat_prompt` first.
  """
  fam = _check_family(family)
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if not prompts:
    raise ValueError("no prompts given")
  if chat_template:
    prompts = [chat_prompt(tokenizer, p) for p in prompts]
  rows = tokenizer(prompts, add_special_tokens=True, padding=False, truncation=False)["input_ids"]
  left = fam in DECODER_ONLY
  if max_length is not None:
    rows = [r[-max_length:] if left else r[:max_length] for r in rows]
  t = max(len(r) for r in rows)
  if pad_to is not None:
    if pad_to < t:
      raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt ({t} tokens)")
    t = pad_to
  pad = tokenizer.pad_token_id
  if pad is None:
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
  ids = np.full((len(rows), t), pad, dtype)
  mask = np.zeros((len(rows), t), dtype)
  for i, r in enumerate(rows):
    if not r:
      continue
    if left:
      ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    else:
      ids[i, :len(r)], mask[i, :len(r)] = r, 1
  return {"input_ids": ids, "attention_mask": mask}
