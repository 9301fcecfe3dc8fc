"""BLIP captioning: HF `BlipForConditionalGeneration.generate` (transformers 5.23) over `search`.

What HF's generate hands its text decoder, and so what this does:
  * the prompt: the processor's ids of the text ("[CLS] a picture of [SEP]" for LAVIS's prompt
    "a picture of "), the first id replaced by `bos_token_id` ([DEC]) and the last ([SEP]) dropped
    (`prompt_ids`); without a prompt, [DEC] alone.
  * eos_token_id = the text config's `sep_token_id` ([SEP]), pad_token_id = its `pad_token_id`;
    HF's max_length / min_length count the prompt (max_new_tokens = max_length - prompt length).
  * the decoder attends causally to the prompt and what it wrote, and to every image token.
The ViT runs once per image; each decoder layer projects the image's cross-attention keys / values
once (the prefill) and every caption row of that image (G = num_captions, times the beams) reads
them from there; the self-attention keys / values of each row go to a cache.

LAVIS's BLIP captioner (`BlipCaption.generate`): prompt "a picture of " (stripped from the
output), ViT-L/16 at 384 px for the large model; beam search with 3 beams, max_length 30 and
min_length 10 and repetition_penalty 1.0 (`BEAM`); with use_nucleus_sampling: top_p 0.9 and a
repetition penalty of 1.1 that its decoder hard-codes, plus HF's default top_k 50 (`generate`
applies it whenever it samples) (`SAMPLING`, what BLIP's CapFilt draws its captions with).

Random streams: `rng` is one key (as `search`), or one key per image (typed (B,) or raw (B, 2)):
caption j of image n then samples step t with fold_in(fold_in(rng[n], j), t), so it depends on
that image's key only, not on the batch, its order or the devices.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.core import xla
from blip2_jax.decoding import search, steps
from blip2_jax.models import blip, registry

# LAVIS BlipCaption.generate (max / min length count the prompt, as HF's max_length / min_length)
BEAM = dict(num_beams=3, max_length=30, min_length=10, repetition_penalty=1.0)
SAMPLING = dict(do_sample=True, num_beams=1, top_p=0.9, top_k=50, repetition_penalty=1.1, max_length=30,
                min_length=10)
PROMPT = "a picture of "
_OPTIONS = dict(max_new_tokens=20, min_new_tokens=0, num_beams=1, do_sample=False, temperature=1.0, top_k=0,
                top_p=1.0, length_penalty=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                early_stopping=False)


def prompt_ids(tokenizer, prompt: str | None, bos_token_id: int) -> np.ndarray:
  """HF BlipForConditionalGeneration.generate's decoder prompt: the tokenizer's ids of `prompt`
  with [DEC] first and the trailing [SEP] dropped; [DEC] alone for None / ""."""
  if not prompt:
    return np.array([bos_token_id], np.int32)
  ids = list(tokenizer(prompt)["input_ids"])
  if len(ids) < 2:
    raise ValueError(f"the tokenizer gave {ids} for {prompt!r}; expected [CLS] ... [SEP]")
  return np.array([bos_token_id] + ids[1:-1], np.int32)


def lengths(prompt_len: int, max_length: int, min_length: int = 0) -> dict:
  """HF / LAVIS max_length / min_length (prompt included) -> max_new_tokens / min_new_tokens."""
  if max_length <= prompt_len:
    raise ValueError(f"max_length {max_length} leaves no new token after a prompt of {prompt_len} tokens")
  return dict(max_new_tokens=max_length - prompt_len, min_new_tokens=max(0, min_length - prompt_len))


def row_keys(rng, rows_per_image: int):
  """Per-image keys (B,) -> per-row keys (B * G,): row n * G + j gets fold_in(rng[n], j)."""
  keys = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(rows_per_image)))(rng)
  return keys.reshape((-1,) + keys.shape[2:])


def prefill(model, params, image_embeds, prompt, *, max_new_tokens: int, rows_per_image: int = 1):
  """-> (first_logits (B*G, V) float32, state, step_fn, context_ids, context_mask): `search`'s
  inputs for G = rows_per_image captions of each of the B images in `image_embeds` (B, S, D),
  all after the same `prompt` ((P,) ids from `prompt_ids`). Traceable; `max_new_tokens` static."""
  registry.require(model, registry.CAPTION, "BLIP captioning")
  variables = {"params": params}
  b = image_embeds.shape[0]
  rows = b * rows_per_image
  prompt = jnp.asarray(prompt, jnp.int32)
  p = prompt.shape[0]
  ctx = jnp.broadcast_to(prompt[None], (rows, p))
  cache = blip.init_cache(model.config.text, rows, p + max_new_tokens)
  out = model.apply(variables, ctx, image_embeds, cache=cache, cache_index=0, method="decode")
  c = out["cache"]
  image_kv = {"ck": c["ck"], "cv": c["cv"]}  # one per image, shared by its rows: closed over, not state
  state = {"cache": steps.to_batch_major({"k": c["k"], "v": c["v"]}), "index": jnp.full((rows,), p, jnp.int32)}

  def step_fn(state, tokens, step=None):
    del step  # the state carries its cache slot
    cache = dict(steps.to_layer_major(state["cache"]), **image_kv)
    o = model.apply(variables, tokens.astype(jnp.int32)[:, None], cache=cache, cache_index=state["index"][0],
                    method="decode")
    new = {"cache": steps.to_batch_major(o["cache"]), "index": state["index"] + 1}
    return o["logits"][:, 0].astype(jnp.float32), new

  # the prompt's slots are the same for every beam of a row
  step_fn.reorder = lambda state, beam_idx: steps.reorder_cache(state, beam_idx, shared_prefix=p)
  return out["logits"][:, -1].astype(jnp.float32), state, step_fn, ctx, jnp.ones((rows, p), jnp.int32)


@functools.lru_cache(maxsize=16)
def _generate_fn(model, opts: tuple, rows_per_image: int, from_pixels: bool, interpolate: bool):
  o = dict(opts)

  def run(params, images, prompt, rng):
    if from_pixels:
      images = model.apply({"params": params}, images, interpolate, method="image_embeds")["last_hidden_state"]
    first, state, step, ctx, mask = prefill(model, params, images, prompt, max_new_tokens=o["max_new_tokens"],
                                            rows_per_image=rows_per_image)
    if search.per_row_keys(rng):
      rng = row_keys(rng, rows_per_image)
    return search.search(step, state, first, ctx, mask, rng=rng, **o)
  return xla.jit(run)


def generate(model, params, pixel_values=None, prompt=None, *, image_embeds=None, num_captions: int = 1,
             rng=None, interpolate_pos_encoding: bool = False, **options):
  """Captions: int32 (B * num_captions, max_new_tokens) new tokens (after the prompt), image-major
  (rows n * num_captions + j), `pad_token_id` after [SEP].

  From `pixel_values` (B, H, W, 3) or the ViT's `image_embeds` (B, S, D). `prompt`: (P,) decoder
  prompt ids (`prompt_ids`; None: [DEC] alone). Options: `search`'s (max_new_tokens=20 and the
  other HF defaults; see `BEAM` / `SAMPLING` and `lengths` for LAVIS's); eos and pad come from the
  text config. rng: one key, or one key per image (module docstring); required to sample. One
  compiled program per model, option set, shapes and `num_captions`."""
  registry.require(model, registry.CAPTION, "BLIP captioning")
  unknown = set(options) - set(_OPTIONS)
  if unknown:
    raise TypeError(f"unknown generation option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
  if (pixel_values is None) == (image_embeds is None):
    raise ValueError("give pixel_values or image_embeds")
  if num_captions < 1:
    raise ValueError(f"num_captions must be >= 1, got {num_captions}")
  text = model.config.text
  o = dict(_OPTIONS, **options, eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id)
  if o["do_sample"] and rng is None:
    raise ValueError("do_sample=True needs rng (one jax key, or one per image)")
  images = pixel_values if pixel_values is not None else image_embeds
  b = np.shape(images)[0]
  if search.per_row_keys(rng) and np.shape(rng)[0] != b:
    raise ValueError(f"rng holds {np.shape(rng)[0]} keys for {b} images (one key, or one per image)")
  prompt = np.array([text.bos_token_id], np.int32) if prompt is None else np.asarray(prompt, np.int32)
  if prompt.ndim != 1 or not len(prompt):
    raise ValueError(f"prompt must be 1-D decoder ids starting with [DEC] (prompt_ids), got shape {prompt.shape}")
  fn = _generate_fn(model, tuple(sorted(o.items())), int(num_captions), pixel_values is not None,
                    bool(interpolate_pos_encoding))
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return fn(params, jnp.asarray(images, jnp.float32) if pixel_values is not None else images, prompt, rng)
