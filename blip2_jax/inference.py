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


def progress_bar(total: int, desc: str, enabled: bool = True):
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
  bar = progress_bar(n, desc, progress)
  for s, e in _padded_batches(n, batch_size):
    res = fn(*[jnp.asarray(_pad_rows(a[s:e], batch_size)) for a in arrays])
    res = res if isinstance(res, tuple) else (res,)
    outs.append([np.asarray(r)[: e - s] for r in res])
    bar.update(e - s)
  bar.close()
  return [np.concatenate(col) for col in zip(*outs)]


# ----------------------------------------------------------------------------------------
# retrieval


def _itc_scores(image_feats: np.ndarray, text_feats: np.ndarray, block: int = 128) -> np.ndarray:
  """(I, Q, E) x (T, E) -> (I, T): max over queries of the dot products, as BLAS matmuls over
  blocks of images (np.einsum does not use BLAS here: 6.4 s against 0.7 s for 1k x 5k)."""
  n, q, e = image_feats.shape
  out = np.empty((n, text_feats.shape[0]), np.float32)
  for s in range(0, n, block):
    f = image_feats[s:s + block]
    out[s:s + len(f)] = (f.reshape(-1, e) @ text_feats.T).reshape(len(f), q, -1).max(axis=1)
  return out


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

  from blip2_jax import generation
  opts = generation.CPU_NO_LIBRARY_FUSIONS
  return (generation.jit(image, opts), generation.jit(text, opts), generation.jit(itm, opts))


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
  itc = _itc_scores(image_feats, text_feats)
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
  return generation.jit(run)


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


# ----------------------------------------------------------------------------------------
# captioning and zero-shot VQA

# LAVIS COCO caption evaluation (blip2 caption_coco configs): beams 5, max_len 30, min_len 8. LAVIS
# passes them as HF max_length / min_length together with `inputs_embeds` only, where HF counts
# new tokens alone (OPT) -- so they are max_new_tokens / min_new_tokens here.
CAPTION_DEFAULTS = dict(num_beams=5, max_new_tokens=30, min_new_tokens=8)
# LAVIS BLIP-2 `predict_answers` (zero-shot VQAv2): beams 5, max_len 10, min_len 1, length_penalty -1.
VQA_DEFAULTS = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)


def task_defaults(model, task: str) -> dict:
  """LAVIS's generation settings for `task` ("caption" / "vqa") and this checkpoint. LAVIS's T5 passes
  `min_length`, which HF counts with the decoder start token: one new token fewer than for OPT."""
  d = dict(CAPTION_DEFAULTS if task == "caption" else VQA_DEFAULTS)
  if getattr(model.config, "is_encoder_decoder", False):
    d["min_new_tokens"] = max(0, d["min_new_tokens"] - 1)
  return d


def _require_lm(model, task: str) -> None:
  if not hasattr(model, "get_image_features") or model.config.text is None:
    raise TypeError(f"{task} needs a checkpoint with a language model (Blip2ForConditionalGeneration or "
                    f"InstructBlipForConditionalGeneration), not {model.config.architecture}")


def _caption_stage1(model, params, tokenizer, images, *, qformer_lm_head, prompt, batch_size, progress,
                    processor, errors, **gen_options):
  """Stage-1 captioning with the Q-Former LM head (no LLM), as LAVIS Blip2Qformer.generate."""
  from blip2_jax.models import qformer_decoding
  if qformer_lm_head is None:
    raise TypeError(f"a {model.config.architecture} checkpoint has no language model; captioning it uses the "
                    "Q-Former LM head: pass qformer_lm_head=weights.hf.load_qformer_head(dir, model)[0]")
  if prompt:
    raise ValueError("stage-1 (Q-Former) captioning starts from [DEC] and takes no prompt")
  ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.sep_token_id,
         "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0}
  if ids["bos_token_id"] is None or ids["eos_token_id"] is None:
    raise ValueError("the Q-Former tokenizer needs a [DEC] bos token and a [SEP] token (LAVIS: BertTokenizer + "
                     "add_special_tokens({'bos_token': '[DEC]'}))")
  options = dict(qformer_decoding.DEFAULTS, **gen_options)

  def run(px, s, e):
    return qformer_decoding.generate(model, params, qformer_lm_head, px, **ids, **options)
  pre, raw = _image_list(images)
  return _batched_texts(run, tokenizer, pre if pre is not None else raw, model.config.vision.image_size,
                        batch_size=batch_size, progress=progress, processor=processor, errors=errors,
                        desc="captioning (Q-Former)")


def _image_list(images):
  """-> (preprocessed float (N, H, W, 3) array or None, list of raw images or None)."""
  if hasattr(images, "ndim") and hasattr(images, "dtype") and images.ndim == 4 and \
      np.issubdtype(np.dtype(images.dtype), np.floating):
    return np.asarray(images, np.float32), None
  if isinstance(images, (str, bytes)) or hasattr(images, "getbands") or \
      (hasattr(images, "ndim") and images.ndim in (2, 3)):
    return None, [images]  # one image
  images = list(images)
  if not images:
    raise ValueError("no images given")
  return None, images


def _pad_repeat(x: np.ndarray, rows: int) -> np.ndarray:
  """Pads to `rows` rows by repeating row 0 (valid inputs: no all-masked rows in padding)."""
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.repeat(x[:1], rows - x.shape[0], axis=0)])


def _generate_texts(model, params, tokenizer, images, prompts: list[str], *, batch_size: int,
                    progress: bool, qformer_tokenizer, processor, errors, desc: str, options: dict
                    ) -> list[str | None]:
  from blip2_jax import processing
  pre, raw = _image_list(images)
  n = len(pre) if pre is not None else len(raw)
  if len(prompts) != n:
    raise ValueError(f"{len(prompts)} prompts for {n} images")
  cfg = model.config
  # every prompt padded to the longest of the whole set: one compile serves every batch
  enc = processing.tokenize_prompts(tokenizer, prompts, cfg.family)
  ids, mask = enc["input_ids"], enc["attention_mask"]
  qids = qmask = None
  if cfg.instruct:
    if qformer_tokenizer is None:
      raise ValueError("InstructBLIP needs qformer_tokenizer (the Q-Former's BERT tokenizer, saved in the "
                       "checkpoint's qformer_tokenizer/ directory): the prompt also enters the Q-Former")
    q = qformer_tokenizer(prompts, padding=True, return_tensors="np")
    qids, qmask = np.asarray(q["input_ids"], np.int32), np.asarray(q["attention_mask"], np.int32)

  def run(px, s, e):
    kw = {}
    if qids is not None:
      kw = dict(qformer_input_ids=_pad_repeat(qids[s:e], len(px)),
                qformer_attention_mask=_pad_repeat(qmask[s:e], len(px)))
    return generate(model, params, px, _pad_repeat(ids[s:e], len(px)), _pad_repeat(mask[s:e], len(px)),
                    **kw, **options)
  return _batched_texts(run, tokenizer, pre if pre is not None else raw, cfg.vision.image_size,
                        batch_size=batch_size, progress=progress, processor=processor, errors=errors, desc=desc)


def _batched_texts(run, tokenizer, images, image_size, *, batch_size, progress, processor, errors, desc):
  """Preprocesses `images` in fixed-size batches (the last padded by repeating its first row) and
  decodes `run(pixel_values, start, end)`'s tokens; unreadable images -> None (with `errors`)."""
  from blip2_jax import processing
  pre = images if isinstance(images, np.ndarray) else None
  n = len(images)
  if processor is None and pre is None:
    processor = processing.ImageProcessor(size=image_size)
  bs = max(1, min(batch_size, n))
  out: list[str | None] = [None] * n
  bar = progress_bar(n, desc, progress)
  for s, e in _padded_batches(n, bs):
    ok = [True] * (e - s)
    if pre is not None:
      px = pre[s:e]
    else:
      rows = []
      for j, im in enumerate(images[s:e]):
        try:
          rows.append(processor.preprocess_one(im))
        except processing.ImageLoadError as err:
          if errors is None:
            raise
          errors.append((s + j, str(err)))
          ok[j] = False
          rows.append(None)
      if not any(ok):
        bar.update(e - s)
        continue
      good = next(r for r in rows if r is not None)
      px = np.stack([good if r is None else r for r in rows])
    tokens = run(_pad_repeat(px, bs), s, e)
    texts = tokenizer.batch_decode(np.asarray(tokens)[: e - s], skip_special_tokens=True)
    for j, t in enumerate(texts):
      if ok[j]:
        out[s + j] = t.strip()
    bar.update(e - s)
  bar.close()
  return out


def caption(model, params, tokenizer, images, *, prompt: str | Sequence[str] | None = None, batch_size: int = 8,
            progress: bool = False, qformer_tokenizer=None, processor=None, errors: list | None = None,
            qformer_lm_head=None, **gen_options) -> list[str]:
  """Captions images with a BLIP-2 / InstructBLIP checkpoint; returns one stripped string per image.

  images: a list of paths / PIL images / uint8 (H, W[, C]) arrays (preprocessed here with `processor`,
  default `ImageProcessor(model.config.vision.image_size)`, which equals HF's for BLIP-2), or an
  already preprocessed float (N, H, W, 3) array. prompt: "a photo of" (`processing.CAPTION_PROMPT`,
  as LAVIS) when None; "" for none; or one prompt per image. The generated continuation (new tokens
  only, special tokens skipped) is returned, without the prompt. InstructBLIP: the prompt also enters
  the Q-Former, tokenised with `qformer_tokenizer`.

  Generation options are `generate`'s; the defaults are LAVIS's COCO caption evaluation
  (`CAPTION_DEFAULTS`: num_beams=5, max_new_tokens=30, min_new_tokens=8; 7 for T5, see `task_defaults`). Images run in batches of
  `batch_size` (the last one padded), prompts are padded to the longest, so one compile serves all.
  Unreadable files raise `processing.ImageLoadError` naming the file; pass a list as `errors` to skip
  them instead: their caption is None and (index, message) is appended to `errors`.

  Stage-1 checkpoints (Blip2ForImageTextRetrieval, no LLM) caption with the Q-Former's own LM head:
  pass `qformer_lm_head` (`weights.hf.load_qformer_head`) and the checkpoint's BERT tokenizer; no
  prompt; defaults are LAVIS's (`qformer_decoding.DEFAULTS`: 3 beams, 9 to 29 new tokens).
  """
  if hasattr(model, "itg_hidden"):
    return _caption_stage1(model, params, tokenizer, images, qformer_lm_head=qformer_lm_head, prompt=prompt,
                           batch_size=batch_size, progress=progress, processor=processor, errors=errors,
                           **gen_options)
  _require_lm(model, "captioning")
  from blip2_jax import processing
  pre, raw = _image_list(images)
  n = len(pre) if pre is not None else len(raw)
  images = pre if pre is not None else raw
  prompt = processing.CAPTION_PROMPT if prompt is None else prompt
  prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
  return _generate_texts(model, params, tokenizer, images, prompts, batch_size=batch_size, progress=progress,
                         qformer_tokenizer=qformer_tokenizer, processor=processor, errors=errors,
                         desc="captioning", options=dict(task_defaults(model, "caption"), **gen_options))


def answer(model, params, tokenizer, images, questions: str | Sequence[str], *, batch_size: int = 8,
           progress: bool = False, qformer_tokenizer=None, processor=None, prompt_template: str | None = None,
           errors: list | None = None, **gen_options) -> list[str]:
  """Zero-shot VQA: one answer string per (image, question) pair.

  images as in `caption` (one image is shared by all the questions); each question is wrapped in
  `processing.vqa_prompt` ("Question: {} Answer:" for OPT / LLaMA, "Question: {} Short answer:" for
  FlanT5) unless `prompt_template` (a str with one {}) is given. InstructBLIP: the same prompt also
  enters the Q-Former (LAVIS and HF's InstructBlipProcessor do the same). Defaults are LAVIS BLIP-2's
  (`VQA_DEFAULTS`: num_beams=5, max_new_tokens=10, min_new_tokens=1 (0 for T5), length_penalty=-1).
  """
  _require_lm(model, "VQA")
  from blip2_jax import processing
  questions = [questions] if isinstance(questions, str) else list(questions)
  if not questions:
    raise ValueError("no questions given")
  pre, raw = _image_list(images)
  images = pre if pre is not None else raw
  if len(images) == 1 and len(questions) > 1:
    images = np.repeat(pre, len(questions), axis=0) if pre is not None else raw * len(questions)
  if len(images) != len(questions):
    raise ValueError(f"{len(questions)} questions for {len(images)} images")
  fam = model.config.family
  prompts = [prompt_template.format(q.strip()) if prompt_template else processing.vqa_prompt(q, fam)
             for q in questions]
  return _generate_texts(model, params, tokenizer, images, prompts, batch_size=batch_size, progress=progress,
                         qformer_tokenizer=qformer_tokenizer, processor=processor, errors=errors,
                         desc="answering", options=dict(task_defaults(model, "vqa"), **gen_options))
