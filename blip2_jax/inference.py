"""Inference on top of the composites: retrieval (ITC + ITM rerank), generation, captioning, VQA.

Everything here is batched with fixed shapes (the last batch is padded), so each function compiles
once per model and batch size.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _progress(total: int, desc: str, enabled: bool):
  """A tqdm bar on stderr when tqdm is installed and `enabled`, else a no-op."""
  if enabled:
    try:
      from tqdm.auto import tqdm
      return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
    except ImportError:
      pass

  class _Null:
    def update(self, n=1):
      pass

    def close(self):
      pass
  return _Null()


def _padded_batches(n: int, batch_size: int) -> Iterable[tuple[int, int]]:
  for start in range(0, n, batch_size):
    yield start, min(start + batch_size, n)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  pad = np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad])


def _map_batched(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int, desc: str,
                 progress: bool) -> list[np.ndarray]:
  """Applies `fn(*batch)` -> tuple of arrays over rows in fixed-size batches; concatenates results."""
  n = arrays[0].shape[0]
  outs: list[list[np.ndarray]] = []
  bar = _progress(n, desc, progress)
  for s, e in _padded_batches(n, batch_size):
    res = fn(*[jnp.asarray(_pad_rows(a[s:e], batch_size)) for a in arrays])
    res = res if isinstance(res, tuple) else (res,)
    outs.append([np.asarray(r)[: e - s] for r in res])
    bar.update(e - s)
  bar.close()
  return [np.concatenate(col) for col in zip(*outs)]


# ----------------------------------------------------------------------------------------
# retrieval


@functools.lru_cache(maxsize=8)
def _retrieval_fns(model):
  def image(params, px):
    vis, _, feats = model.apply({"params": params}, px, method="image_features")
    return vis["last_hidden_state"], feats

  def text(params, ids, mask):
    return model.apply({"params": params}, ids, mask, method="text_features")[1]

  def itm(params, image_embeds, ids, mask):
    logits, _ = model.apply({"params": params}, image_embeds, ids, mask, method="itm_logits")
    return logits[:, 1]

  return jax.jit(image), jax.jit(text), jax.jit(itm)


def retrieval_scores(model, params, pixel_values, input_ids, attention_mask=None, *, k: int = 128,
                     batch_size: int = 32, progress: bool = False) -> dict[str, np.ndarray]:
  """BLIP-2 retrieval as LAVIS evaluates it: ITC similarity (max over queries of the cosine of the
  normalised projections, no temperature) for all image-text pairs, then each image's top-k texts
  and each text's top-k images re-scored as ITM logit[:, 1] (averaged over queries) + ITC.

  Returns {"itc": (I, T), "i2t": (I, T), "t2i": (T, I)}; pairs outside a top-k keep -100 in
  i2t / t2i, as LAVIS. `model` must be a Blip2ForImageTextRetrieval.
  """
  if not hasattr(model, "itm_logits"):
    raise TypeError(f"retrieval needs a Blip2ForImageTextRetrieval checkpoint, not "
                    f"{model.config.architecture}")
  pixel_values = np.asarray(pixel_values, np.float32)
  input_ids = np.asarray(input_ids, np.int32)
  attention_mask = (np.ones_like(input_ids) if attention_mask is None
                    else np.asarray(attention_mask, np.int32))
  image_fn, text_fn, itm_fn = _retrieval_fns(model)
  image_embeds, image_feats = _map_batched(lambda px: image_fn(params, px), [pixel_values], batch_size,
                                           "image features", progress)
  (text_feats,) = _map_batched(lambda i, m: text_fn(params, i, m), [input_ids, attention_mask],
                               batch_size, "text features", progress)
  itc = np.einsum("iqe,te->iqt", image_feats, text_feats).max(axis=1)
  n_img, n_txt = itc.shape

  emb_d, ids_d, mask_d = (jnp.asarray(a) for a in (image_embeds, input_ids, attention_mask))

  def rerank(pairs_img: np.ndarray, pairs_txt: np.ndarray, desc: str) -> np.ndarray:
    def fn(img_idx, txt_idx):
      return itm_fn(params, emb_d[img_idx], ids_d[txt_idx], mask_d[txt_idx])
    (scores,) = _map_batched(fn, [pairs_img, pairs_txt], batch_size, desc, progress)
    return scores

  i2t = np.full((n_img, n_txt), -100.0, np.float32)
  kt = min(k, n_txt)
  top_t = np.argsort(-itc, axis=1, kind="stable")[:, :kt]  # (I, kt)
  img_idx = np.repeat(np.arange(n_img), kt).astype(np.int32)
  txt_idx = top_t.reshape(-1).astype(np.int32)
  i2t[img_idx, txt_idx] = rerank(img_idx, txt_idx, "ITM rerank i2t") + itc[img_idx, txt_idx]

  t2i = np.full((n_txt, n_img), -100.0, np.float32)
  ki = min(k, n_img)
  top_i = np.argsort(-itc.T, axis=1, kind="stable")[:, :ki]  # (T, ki)
  txt_idx = np.repeat(np.arange(n_txt), ki).astype(np.int32)
  img_idx = top_i.reshape(-1).astype(np.int32)
  t2i[txt_idx, img_idx] = rerank(img_idx, txt_idx, "ITM rerank t2i") + itc[img_idx, txt_idx]
  return {"itc": itc, "i2t": i2t, "t2i": t2i}


# ----------------------------------------------------------------------------------------
# generation

_GEN_DEFAULTS = dict(max_new_tokens=30, min_new_tokens=0, num_beams=1, do_sample=False, temperature=1.0,
                     top_k=0, top_p=1.0, length_penalty=1.0, repetition_penalty=1.0,
                     no_repeat_ngram_size=0, eos_token_id=None, pad_token_id=None)


@functools.lru_cache(maxsize=32)
def _generate_fn(model, opts: tuple):
  from blip2_jax import generation
  from blip2_jax.models import decoding
  o = dict(opts)

  def run(params, pixel_values, input_ids, attention_mask, qformer_input_ids, qformer_attention_mask, rng):
    first, state, step, ctx, ctx_mask = decoding.prefill(
        model, params, pixel_values, input_ids, attention_mask, max_new_tokens=o["max_new_tokens"],
        qformer_input_ids=qformer_input_ids, qformer_attention_mask=qformer_attention_mask)
    return generation.search(step, state, first, ctx, ctx_mask, rng=rng, **o)
  return jax.jit(run)


def generate(model, params, pixel_values, input_ids=None, attention_mask=None, *, qformer_input_ids=None,
             qformer_attention_mask=None, rng=None, **options):
  """Generates text conditioned on images: int32 (B, max_new_tokens) of new tokens only, padded with
  `pad_token_id` after EOS. Options and their defaults are HF `generate`'s: max_new_tokens=30,
  min_new_tokens=0, num_beams=1, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
  length_penalty=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id / pad_token_id
  (default: the LLM config's). Prefill and search are one compiled program per model, option set
  and input shapes; `input_ids` hold the prompt's text tokens only (left-padded for OPT / LLaMA).
  """
  unknown = set(options) - set(_GEN_DEFAULTS)
  if unknown:
    raise TypeError(f"unknown generation option(s) {sorted(unknown)}; known: {sorted(_GEN_DEFAULTS)}")
  if not hasattr(model, "get_image_features") or model.config.text is None:
    raise TypeError(f"generation needs a checkpoint with a language model, not {model.config.architecture}")
  o = dict(_GEN_DEFAULTS, **options)
  text = model.config.text
  if o["eos_token_id"] is None:
    o["eos_token_id"] = text.eos_token_id
  if o["pad_token_id"] is None:
    o["pad_token_id"] = text.pad_token_id
  if o["do_sample"] and rng is None:
    raise ValueError("do_sample=True needs rng=jax.random.key(...)")
  if rng is None:
    rng = jax.random.PRNGKey(0)
  fn = _generate_fn(model, tuple(sorted(o.items())))
  return fn(params, jnp.asarray(pixel_values, jnp.float32), input_ids, attention_mask, qformer_input_ids,
            qformer_attention_mask, rng)
