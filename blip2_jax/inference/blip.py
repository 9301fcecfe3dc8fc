"""BLIP for CapFilt: captions from the BLIP captioner, match scores from the BLIP filter.

    keys = image_keys(["000123", "000124"], seed=0)            # one key per image, from its name
    caps = blip_captions(captioner, cparams, tok, pixel_values, keys=keys, num_captions=10)
    embeds = blip_image_embeds(filt, fparams, pixel_values)    # the filter's ViT, once per image
    probs = blip_itm_scores(filt, fparams, tok, embeds, [[web_0, *caps[0]], [web_1, *caps[1]]])
    cosines = blip_itm_scores(filt, fparams, tok, embeds, texts, mode="itc")

`blip_captions` defaults to what BLIP's CapFilt samples with (LAVIS `BlipCaption.generate` with
use_nucleus_sampling: prompt "a picture of ", max_length 30 and min_length 10 counting the prompt,
top_p 0.9, the decoder's hard-coded repetition_penalty 1.1, and HF generate's default top_k 50);
the prompt is not part of the returned text. Caption j of image n samples with
fold_in(fold_in(keys[n], j), step), so an image gets the same captions in any batch, on any number
of devices. Beam search (LAVIS's default captioning): do_sample=False, num_beams=3,
repetition_penalty=1.0.

`blip_itm_scores` scores every text of an image against that image's features, computed once:
each cross-attention layer projects the image's keys / values once for all its texts. "itm" gives
the ITM head's match probability softmax(logits)[1] (BLIP's filter drops a text whose probability
is below 0.5), "itc" the cosine of the projected [CLS] features (no temperature). Texts are
tokenised as LAVIS's BlipITM does (padded, truncated to max_length 35). LAVIS also puts [ENC] in
place of [CLS] for the ITM pass; HF's BlipForImageTextRetrieval keeps [CLS], and so does this unless
`enc_token_id` is given.

Every function compiles once per model, option set and batch shape; inputs may be sharded jax
arrays (the row order is image-major, so rows of one image stay together).
"""
from __future__ import annotations

import functools
import hashlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.core import xla
from blip2_jax.decoding import blip as blip_decoding
from blip2_jax.models import registry

ITM_MAX_LENGTH = 35  # LAVIS BlipITM max_txt_len


def image_keys(names: Sequence[str], seed: int = 0):
  """Typed jax keys (N,), one per image name: `seed`'s key folded with 64 bits of the name's
  SHA-256, so an image's key depends on its name and the seed alone."""
  h = np.array([int.from_bytes(hashlib.sha256(str(n).encode()).digest()[:8], "little") for n in names],
               np.uint64).reshape(-1)
  lo, hi = (h & 0xFFFFFFFF).astype(np.uint32), (h >> 32).astype(np.uint32)
  fold = lambda a, b: jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), a), b)
  return jax.vmap(fold)(jnp.asarray(lo), jnp.asarray(hi))


def blip_captions(model, params, tokenizer, pixel_values, *, keys=None, num_captions: int = 1,
                  prompt: str | None = blip_decoding.PROMPT, max_length: int = 30, min_length: int = 10,
                  do_sample: bool = True, top_p: float = 0.9, top_k: int = 50, temperature: float = 1.0,
                  repetition_penalty: float = 1.1, num_beams: int = 1, length_penalty: float = 1.0,
                  no_repeat_ngram_size: int = 0, interpolate_pos_encoding: bool = False) -> list[list[str]]:
  """`num_captions` captions for each image of `pixel_values` (N, H, W, 3), preprocessed as the
  checkpoint's processor does: a list of N lists of strings, without the prompt.

  keys: one jax key per image (typed (N,) or raw (N, 2); `image_keys`), required to sample.
  max_length / min_length count the prompt tokens (LAVIS, HF); the rest are HF generate's options.
  Defaults: BLIP's CapFilt sampling (module docstring)."""
  registry.require(model, registry.CAPTION, "BLIP captioning")
  text = model.config.text
  prompt_ids = blip_decoding.prompt_ids(tokenizer, prompt, text.bos_token_id)
  opts = dict(blip_decoding.lengths(len(prompt_ids), max_length, min_length), num_beams=num_beams,
              do_sample=do_sample, top_p=top_p, top_k=top_k, temperature=temperature,
              repetition_penalty=repetition_penalty, length_penalty=length_penalty,
              no_repeat_ngram_size=no_repeat_ngram_size)
  if do_sample and keys is None:
    raise ValueError("sampling needs keys: one jax key per image (blip2_jax.inference.blip.image_keys)")
  tokens = blip_decoding.generate(model, params, pixel_values, prompt_ids, num_captions=num_captions, rng=keys,
                                  interpolate_pos_encoding=interpolate_pos_encoding, **opts)
  texts = [t.strip() for t in tokenizer.batch_decode(np.asarray(tokens), skip_special_tokens=True)]
  return [texts[i:i + num_captions] for i in range(0, len(texts), num_captions)]


@functools.lru_cache(maxsize=8)
def _vision_fn(model, interpolate: bool):
  def run(params, px):
    vis = lambda m, px: m.vision_model(px, interpolate_pos_encoding=interpolate)
    return model.apply({"params": params}, px, method=vis)["last_hidden_state"]
  return xla.jit(run, xla.CPU_NO_LIBRARY_FUSIONS)


def blip_image_embeds(model, params, pixel_values, *, interpolate_pos_encoding: bool = False):
  """The ViT's last hidden states (N, S, D) of a BLIP model: what `blip_itm_scores` (filter) or
  `decoding.blip.generate(image_embeds=...)` (captioner) take, so an image's ViT runs once."""
  return _vision_fn(model, bool(interpolate_pos_encoding))(params, jnp.asarray(pixel_values, jnp.float32))


@functools.lru_cache(maxsize=8)
def _score_fn(model, mode: str):
  def itm(params, image_embeds, ids, mask):
    logits, _ = model.apply({"params": params}, image_embeds, ids, mask, method="itm_logits")
    return jax.nn.softmax(logits, axis=-1)[:, 1]

  def itc(params, image_embeds, ids, mask):
    img = model.apply({"params": params}, image_embeds, method="image_feature")
    _, txt = model.apply({"params": params}, ids, mask, method="text_features")
    rows = jnp.repeat(img, ids.shape[0] // img.shape[0], axis=0)
    return jnp.sum(rows * txt, axis=-1)
  return xla.jit(itm if mode == "itm" else itc, xla.CPU_NO_LIBRARY_FUSIONS)


def blip_itm_scores(model, params, tokenizer, images, texts: Sequence[Sequence[str]], *, mode: str = "itm",
                    max_length: int = ITM_MAX_LENGTH, enc_token_id: int | None = None,
                    interpolate_pos_encoding: bool = False) -> list[np.ndarray]:
  """Scores of `texts[n]` (any number, 0 included) against image n: a list of N float32 arrays.

  images: pixel values (N, H, W, 3), or the filter's image embeddings (N, S, D) from
  `blip_image_embeds`. mode: "itm" (match probability) or "itc" (cosine); see the module docstring
  for `max_length` and `enc_token_id`."""
  registry.require(model, registry.ITM, "BLIP ITM / ITC scoring")
  if mode not in ("itm", "itc"):
    raise ValueError(f"mode must be 'itm' or 'itc', got {mode!r}")
  images = images if np.ndim(images) == 3 else blip_image_embeds(
      model, params, images, interpolate_pos_encoding=interpolate_pos_encoding)
  n = images.shape[0]
  if len(texts) != n:
    raise ValueError(f"{len(texts)} text lists for {n} images")
  counts = [len(t) for t in texts]
  k = max(max(counts, default=0), 1)
  flat = [t[j] if j < len(t) else "" for t in texts for j in range(k)]  # "" fills the short lists
  enc = tokenizer(flat, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
  ids, mask = np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)
  if enc_token_id is not None and mode == "itm":
    ids[:, 0] = enc_token_id
  scores = np.asarray(_score_fn(model, mode)(params, images, ids, mask)).reshape(n, k)
  return [scores[i, :c] for i, c in enumerate(counts)]
