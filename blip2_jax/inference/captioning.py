"""Captioning and zero-shot VQA over lists of images (paths, PIL images, arrays), with LAVIS's defaults."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from blip2_jax.core.progress import progress_bar
from blip2_jax.data import processing
from blip2_jax.decoding import qformer as qformer_decoding
from blip2_jax.decoding import search
from blip2_jax.inference.batching import pad_repeat, padded_batches
from blip2_jax.inference.generation import check_context, generate
from blip2_jax.models import blip2, registry

# LAVIS COCO caption evaluation (blip2 caption_coco configs): beams 5, max_len 30, min_len 8. LAVIS
# passes them as HF max_length / min_length together with `inputs_embeds` only, where HF counts
# new tokens alone (OPT) -- so they are max_new_tokens / min_new_tokens here.
CAPTION_DEFAULTS = dict(num_beams=5, max_new_tokens=30, min_new_tokens=8)
# LAVIS BLIP-2 `predict_answers` (zero-shot VQAv2): beams 5, max_len 10, min_len 1, length_penalty -1.
VQA_DEFAULTS = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)


def _config(model) -> blip2.Blip2Config:
  return model if isinstance(model, blip2.Blip2Config) else model.config


def task_defaults(model, task: str) -> dict:
  """LAVIS's generation settings for `task` ("caption" / "vqa") and this checkpoint (a model or its
  Blip2Config). LAVIS's T5 passes `min_length`, which HF counts with the decoder start token: one new
  token fewer than for OPT."""
  d = dict(CAPTION_DEFAULTS if task == "caption" else VQA_DEFAULTS)
  if _config(model).is_encoder_decoder:
    d["min_new_tokens"] = max(0, d["min_new_tokens"] - 1)
  return d


def caption_prompts(n: int, prompt: str | Sequence[str] | None) -> list[str]:
  """`n` caption prompts: "a photo of" (`processing.CAPTION_PROMPT`, as LAVIS) when None, "" for none, a
  string for all, or one per image."""
  prompt = processing.CAPTION_PROMPT if prompt is None else prompt
  return [prompt] * n if isinstance(prompt, str) else list(prompt)


def vqa_prompts(model, questions: Sequence[str], prompt_template: str | None = None) -> list[str]:
  """Each question in `prompt_template` (a str with one {}) or `processing.vqa_prompt` of the family."""
  fam = _config(model).family
  return [prompt_template.format(q.strip()) if prompt_template else processing.vqa_prompt(q, fam) for q in questions]


def _checked_prompts(cfg, tokenizer, prompts: list[str], qformer_tokenizer, options: dict,
                     chat_template: bool = False):
  """Tokenised prompts (padded to the longest: one compile for every batch) -> (ids, mask, Q-Former ids
  or None, its mask or None), after the checks `generate` makes, so that they fail before any image is
  read: the options (`search.check_options`) and the positions (`check_context`). The LLM reads the
  prompts in its chat template if asked; InstructBLIP's Q-Former reads them raw."""
  search.check_options(**options)
  enc = processing.tokenize_prompts(tokenizer, prompts, cfg.family, chat_template=chat_template)
  ids, mask = enc["input_ids"], enc["attention_mask"]
  qids = qmask = None
  if cfg.instruct:
    if qformer_tokenizer is None:
      raise ValueError("InstructBLIP needs qformer_tokenizer (the Q-Former's BERT tokenizer, saved in the "
                       "checkpoint's qformer_tokenizer/ directory): the prompt also enters the Q-Former")
    q = qformer_tokenizer(prompts, padding=True, return_tensors="np")
    qids, qmask = np.asarray(q["input_ids"], np.int32), np.asarray(q["attention_mask"], np.int32)
  check_context(cfg, int(mask.sum(axis=1).max()), options["max_new_tokens"],
                qformer_prompt_tokens=0 if qmask is None else int(qmask.sum(axis=1).max()))
  return ids, mask, qids, qmask


def check_generation(model, tokenizer, prompts: Sequence[str], task: str, *, qformer_tokenizer=None,
                     chat_template: bool = False, **gen_options) -> dict:
  """What `caption` (task "caption") / `answer` ("vqa") would refuse for these prompts and options, checked
  without weights or images (`model` may be a Blip2Config): ValueError naming the problem (min_new_tokens
  above max_new_tokens, a non-finite float, queries + prompt + new tokens past the LLM's positions).
  Returns the options generation will use. The command lines call it before the weights load."""
  cfg = _config(model)
  options = search.with_defaults(task_defaults(cfg, task), gen_options)
  _checked_prompts(cfg, tokenizer, list(prompts), qformer_tokenizer, options, chat_template)
  return options


def _caption_stage1(model, params, tokenizer, images, *, qformer_lm_head, prompt, batch_size, progress,
                    processor, errors, **gen_options):
  """Stage-1 captioning with the Q-Former LM head (no LLM), as LAVIS Blip2Qformer.generate."""
  if qformer_lm_head is None:
    raise TypeError(f"a {model.config.architecture} checkpoint has no language model; captioning it uses the "
                    "Q-Former LM head: pass qformer_lm_head=checkpoints.hf.load_qformer_head(dir, model)[0]")
  if prompt:
    raise ValueError("stage-1 (Q-Former) captioning starts from [DEC] and takes no prompt")
  ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.sep_token_id,
         "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0}
  if ids["bos_token_id"] is None or ids["eos_token_id"] is None:
    raise ValueError("the Q-Former tokenizer needs a [DEC] bos token and a [SEP] token (LAVIS: BertTokenizer + "
                     "add_special_tokens({'bos_token': '[DEC]'}))")
  options = qformer_decoding.checked_options(model.config, **gen_options)

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


def _generate_texts(model, params, tokenizer, images, prompts: list[str], *, batch_size: int,
                    progress: bool, qformer_tokenizer, processor, errors, desc: str, options: dict,
                    chat_template: bool = False) -> list[str | None]:
  pre, raw = _image_list(images)
  n = len(pre) if pre is not None else len(raw)
  if len(prompts) != n:
    raise ValueError(f"{len(prompts)} prompts for {n} images")
  cfg = model.config
  ids, mask, qids, qmask = _checked_prompts(cfg, tokenizer, prompts, qformer_tokenizer, options, chat_template)

  def run(px, s, e):
    kw = {}
    if qids is not None:
      kw = dict(qformer_input_ids=pad_repeat(qids[s:e], len(px)),
                qformer_attention_mask=pad_repeat(qmask[s:e], len(px)))
    return generate(model, params, px, pad_repeat(ids[s:e], len(px)), pad_repeat(mask[s:e], len(px)),
                    **kw, **options)
  return _batched_texts(run, tokenizer, pre if pre is not None else raw, cfg.vision.image_size,
                        batch_size=batch_size, progress=progress, processor=processor, errors=errors, desc=desc)


def _batch_pixels(images, s: int, e: int, processor, errors):
  """Rows s..e of `images` preprocessed -> (pixels, which rows were readable); an unreadable row takes
  a readable one's pixels (its result is dropped), or ImageLoadError when `errors` is None."""
  rows, ok = [], [True] * (e - s)
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
    return None, ok
  good = next(r for r in rows if r is not None)
  return np.stack([good if r is None else r for r in rows]), ok


def _batched_texts(run, tokenizer, images, image_size, *, batch_size, progress, processor, errors, desc):
  """Preprocesses `images` in fixed-size batches (the last padded by repeating its first row) and
  decodes `run(pixel_values, start, end)`'s tokens; unreadable images -> None (with `errors`)."""
  pre = images if isinstance(images, np.ndarray) else None
  n = len(images)
  if processor is None and pre is None:
    processor = processing.ImageProcessor(size=image_size)
  bs = max(1, min(batch_size, n))
  out: list[str | None] = [None] * n
  with progress_bar(n, desc, progress) as bar:  # closed on an error too: the error line starts a line
    for s, e in padded_batches(n, bs):
      px, ok = (pre[s:e], [True] * (e - s)) if pre is not None else _batch_pixels(images, s, e, processor, errors)
      if px is not None:
        tokens = run(pad_repeat(px, bs), s, e)
        texts = tokenizer.batch_decode(np.asarray(tokens)[: e - s], skip_special_tokens=True)
        for j, t in enumerate(texts):
          if ok[j]:
            out[s + j] = t.strip()
      bar.update(e - s)
  return out


def caption(model, params, tokenizer, images, *, prompt: str | Sequence[str] | None = None, batch_size: int = 8,
            progress: bool = False, qformer_tokenizer=None, processor=None, errors: list | None = None,
            qformer_lm_head=None, chat_template: bool = False, **gen_options) -> list[str]:
  """Captions images with a BLIP-2 / InstructBLIP checkpoint; returns one stripped string per image.

  images: a list of paths / PIL images / uint8 (H, W[, C]) arrays (preprocessed here with `processor`,
  default `ImageProcessor(model.config.vision.image_size)`, which equals HF's for BLIP-2), or an
  already preprocessed float (N, H, W, 3) array. prompt: "a photo of" (`processing.CAPTION_PROMPT`,
  as LAVIS) when None; "" for none; or one prompt per image. The generated continuation (new tokens
  only, special tokens skipped) is returned, without the prompt. InstructBLIP: the prompt also enters
  the Q-Former, tokenised with `qformer_tokenizer`. `chat_template`: the LLM reads each prompt as a
  user turn of its tokenizer's chat template (`processing.chat_prompt`; instruction-tuned LLMs).

  Generation options are `generate`'s; the defaults are LAVIS's COCO caption evaluation
  (`CAPTION_DEFAULTS`: num_beams=5, max_new_tokens=30, min_new_tokens=8; 7 for T5, see `task_defaults`;
  a default minimum above a max_new_tokens you give is lowered to it, `search.with_defaults`). The options
  and the LLM's positions are checked before any image is read (`check_generation`: ValueError with the
  numbers); NaN / infinite logits raise `NonFiniteError`. Images run in batches of
  `batch_size` (the last one padded), prompts are padded to the longest, so one compile serves all.
  Unreadable files raise `processing.ImageLoadError` naming the file; pass a list as `errors` to skip
  them instead: their caption is None and (index, message) is appended to `errors`.

  Stage-1 checkpoints (Blip2ForImageTextRetrieval, no LLM) caption with the Q-Former's own LM head:
  pass `qformer_lm_head` (`checkpoints.hf.load_qformer_head`) and the checkpoint's BERT tokenizer; no
  prompt; defaults are LAVIS's (`qformer_decoding.DEFAULTS`: 3 beams, 9 to 29 new tokens).
  """
  if registry.can(model, registry.ITG):
    return _caption_stage1(model, params, tokenizer, images, qformer_lm_head=qformer_lm_head, prompt=prompt,
                           batch_size=batch_size, progress=progress, processor=processor, errors=errors,
                           **gen_options)
  registry.require(model, registry.LM, "captioning")
  pre, raw = _image_list(images)
  n = len(pre) if pre is not None else len(raw)
  images = pre if pre is not None else raw
  return _generate_texts(model, params, tokenizer, images, caption_prompts(n, prompt), batch_size=batch_size,
                         progress=progress, qformer_tokenizer=qformer_tokenizer, processor=processor, errors=errors,
                         desc="captioning", options=search.with_defaults(task_defaults(model, "caption"), gen_options),
                         chat_template=chat_template)


def answer(model, params, tokenizer, images, questions: str | Sequence[str], *, batch_size: int = 8,
           progress: bool = False, qformer_tokenizer=None, processor=None, prompt_template: str | None = None,
           errors: list | None = None, chat_template: bool = False, **gen_options) -> list[str]:
  """Zero-shot VQA: one answer string per (image, question) pair.

  images as in `caption` (one image is shared by all the questions); each question is wrapped in
  `processing.vqa_prompt` ("Question: {} Answer:" for OPT / LLaMA, "Question: {} Short answer:" for
  FlanT5) unless `prompt_template` (a str with one {}) is given. InstructBLIP: the same prompt also
  enters the Q-Former (LAVIS and HF's InstructBlipProcessor do the same). Defaults are LAVIS BLIP-2's
  (`VQA_DEFAULTS`: num_beams=5, max_new_tokens=10, min_new_tokens=1 (0 for T5), length_penalty=-1).
  """
  registry.require(model, registry.LM, "VQA")
  questions = [questions] if isinstance(questions, str) else list(questions)
  if not questions:
    raise ValueError("no questions given")
  pre, raw = _image_list(images)
  images = pre if pre is not None else raw
  if len(images) == 1 and len(questions) > 1:
    images = np.repeat(pre, len(questions), axis=0) if pre is not None else raw * len(questions)
  if len(images) != len(questions):
    raise ValueError(f"{len(questions)} questions for {len(images)} images")
  return _generate_texts(model, params, tokenizer, images, vqa_prompts(model, questions, prompt_template),
                         batch_size=batch_size, progress=progress, qformer_tokenizer=qformer_tokenizer,
                         processor=processor, errors=errors, desc="answering",
                         options=search.with_defaults(task_defaults(model, "vqa"), gen_options),
                         chat_template=chat_template)
