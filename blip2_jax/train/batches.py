"""Host-side batch assembly: a data-pipeline batch (numpy) -> the model batch of each task (train/tasks.py).

Every array gets a fixed width (`max_txt_len`), so the train step compiles once.
  stage1 / retrieval: pixel_values + BERT input_ids / attention_mask (tokenised in the pipeline)
  stage2 / caption:   pixel_values + LLM input_ids / attention_mask / labels (losses.build_stage2_batch:
                      OPT caption + "\\n", LLaMA + EOS, T5 prefix-LM split), caption FT with a prompt
                      masked as `loss.prompt_mask` says (an InstructBLIP model also reads the prompt
                      in its Q-Former)
  vqa:                a prefix LM: prompt "Question: {q} Answer:" ("Short answer:" for T5, as zero-shot
                      BLIP-2 VQA) and one answer per question, drawn from "answers" by annotator frequency
                      (`tasks.vqa_fields`); the loss is on the answer only (`prefix_lm_text`)
  instruct:           the instruction as the prompt, the response as the target (`prefix_lm_text`)
With `loss.chat_template` the LLM reads the prompts of both prefix-LM tasks as a user turn of its
tokenizer's chat template (`processing.chat_prompt`: instruction-tuned Qwen / Gemma / Mistral ...).
Both prefix-LM tasks give the prompt to the Q-Former too (qformer_input_ids) when the model is an
InstructBLIP; a BLIP-2 Q-Former has no text input (HF Blip2ForConditionalGeneration), so there
the prompt reaches the LLM only, as LAVIS's BLIP-2 VQA does.
"""
from __future__ import annotations

import numpy as np

from blip2_jax.data import processing
from blip2_jax.train import losses, tasks

IGNORE = losses.IGNORE


def fix_width(x: np.ndarray, width: int, fill) -> np.ndarray:
  """Pads (right) or truncates the last axis to `width`."""
  x = np.asarray(x)
  if x.shape[-1] >= width:
    return x[..., :width]
  pad = np.full(x.shape[:-1] + (width - x.shape[-1],), fill, x.dtype)
  return np.concatenate([x, pad], axis=-1)


_pad_id = losses.pad_id


def _fixed(batch: dict, width: int, pad: int) -> dict:
  fills = {"input_ids": pad, "attention_mask": 0, "labels": IGNORE, "decoder_attention_mask": 0,
           "qformer_input_ids": 0, "qformer_attention_mask": 0}
  return {k: fix_width(v, width, fills[k]).astype(np.int32) if k in fills else v for k, v in batch.items()}


def _rows(tok, texts, add_special_tokens=True):
  return tok(list(texts), add_special_tokens=add_special_tokens)["input_ids"]


def prefix_lm_text(tok, family: str, prompts, targets, max_len: int, eos_token_id: int | None = None) -> dict:
  """LLM side of a prompt -> target batch (VQA, instructions), right padded to max_len; loss on the target.

  decoder-only (OPT, LLaMA, Qwen, Mistral, Gemma): [prompt + " " + target, EOS] tokenised as ONE string (as at generation
    time, where the answer continues the prompt: a BPE tokenizer then gives " red", not "red"), labels
    from the prompt's own token count on (the prompt, incl. BOS, carries no loss). `eos_token_id` is
    the token generation stops at (the model's text config: "\\n" for HF's BLIP-2 OPT), else the
    tokenizer's EOS. A target that the truncation cuts off entirely carries no loss.
  t5: the prompt to the encoder, the target (+ </s> from the tokenizer) as the decoder labels.
  """
  pad = _pad_id(tok)
  n = len(prompts)
  ids = np.full((n, max_len), pad, np.int32)
  mask = np.zeros((n, max_len), np.int32)
  labels = np.full((n, max_len), IGNORE, np.int32)
  if family == "t5":
    dmask = np.zeros((n, max_len), np.int32)
    for i, (a, b) in enumerate(zip(_rows(tok, prompts), _rows(tok, targets))):
      a, b = a[:max_len], b[:max_len]
      ids[i, :len(a)], mask[i, :len(a)] = a, 1
      labels[i, :len(b)], dmask[i, :len(b)] = b, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "decoder_attention_mask": dmask}
  if isinstance(eos_token_id, (tuple, list)):  # several stop ids (Qwen2.5, Gemma 3): the first ends rows
    eos_token_id = eos_token_id[0]
  eos = tok.eos_token_id if eos_token_id is None else int(eos_token_id)
  heads = _rows(tok, prompts)
  # the target continues the prompt after a space, or right after a newline (a chat template's
  # assistant turn opens with one)
  seps = ["" if p.endswith("\n") else " " for p in prompts]
  fulls = _rows(tok, [(p if s == "" else p.rstrip()) + s + t.strip() for p, s, t in zip(prompts, seps, targets)])
  for i, (a, full) in enumerate(zip(heads, fulls)):
    if list(full[:len(a)]) != list(a):  # the tokenizer merged across the boundary: tokenise apart
      full = list(a) + _rows(tok, [seps[i] + str(targets[i]).strip()], add_special_tokens=False)[0]
    seq = (list(full) + [eos])[:max_len]
    ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
    labels[i, len(a):len(seq)] = seq[len(a):]
  return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def instruct_text(tok, family: str, instructions, responses, max_len: int, eos_token_id: int | None = None) -> dict:
  """LLM side of an instruction batch: `prefix_lm_text` with the instruction as the prompt."""
  return prefix_lm_text(tok, family, instructions, responses, max_len, eos_token_id)


def qformer_text(qtok, texts, width: int) -> dict:
  """The InstructBLIP Q-Former's text input: BERT tokens, padded / truncated to `width`."""
  q = qtok(list(texts), padding="max_length", truncation=True, max_length=width, return_tensors="np")
  return {"qformer_input_ids": np.asarray(q["input_ids"], np.int32),
          "qformer_attention_mask": np.asarray(q["attention_mask"], np.int32)}


def make_batch_fn(config, setup):
  """-> fn(pipeline_batch, np.random.Generator) -> model batch (numpy, fixed widths)."""
  task = tasks.get(config.task)
  width = int(config.data.max_txt_len)
  family = setup.model.config.family

  if task.stage1:
    def stage1(b, rng):
      return {"pixel_values": b["image"], "input_ids": b["input_ids"].astype(np.int32),
              "attention_mask": b["attention_mask"].astype(np.int32)}
    return stage1

  ltok, qtok = setup.llm_tokenizer, setup.qformer_tokenizer
  instruct_model = bool(setup.model.config.instruct)
  if instruct_model and qtok is None:
    raise ValueError("an InstructBLIP model needs the Q-Former tokenizer (config.tokenizer.qformer)")
  eos = setup.model.config.text.eos_token_id
  if task.records == "caption":
    def lm(b, rng):
      text = losses.build_stage2_batch(ltok, [str(t) for t in b["text"]], family, prompt=config.loss.prompt,
                                       max_len=width, prefix_ratio=config.loss.t5_prefix_ratio, rng=rng,
                                       prompt_mask=config.loss.get("prompt_mask", "lavis"))
      out = dict(_fixed(text, width, _pad_id(ltok)), pixel_values=b["image"])
      if instruct_model:  # the prompt is the InstructBLIP instruction (as at captioning time)
        out.update(qformer_text(qtok, [config.loss.prompt] * len(b["text"]), width))
      return out
    return lm

  template = str(config.loss.get("vqa_prompt", "") or "")

  def prompt_of(q: str) -> str:
    return template.format(q.strip()) if template else processing.vqa_prompt(q, family)

  chat = bool(config.loss.get("chat_template", False))

  def prefix_lm(b, rng):
    if task.records == "vqa":
      prompts, targets = [prompt_of(str(q)) for q in b["question"]], [str(a) for a in b["answer"]]
    else:
      prompts, targets = [str(t) for t in b["instruction"]], [str(t) for t in b["response"]]
    # the LLM reads the prompt in its chat template if asked (as `inference` then does); the Q-Former raw
    llm_prompts = [processing.chat_prompt(ltok, p) for p in prompts] if chat else prompts
    out = prefix_lm_text(ltok, family, llm_prompts, targets, width, eos)
    if instruct_model:
      out.update(qformer_text(qtok, prompts, width))
    out["pixel_values"] = b["image"]
    return out
  return prefix_lm


def abstract_batch(config, setup, sharding=None) -> dict:
  """The global model batch `make_batch_fn(config, setup)` gives, as jax.ShapeDtypeStructs (placed
  in `sharding`): what the train step is compiled for ahead of time (python -m blip2_jax.aot)."""
  import jax
  b, w, size = int(config.global_batch_size), int(config.data.max_txt_len), int(config.model.image_size)
  cfg = setup.model.config
  text = ["input_ids", "attention_mask"]
  if not tasks.get(config.task).stage1:
    text.append("labels")
    if cfg.is_encoder_decoder:
      text.append("decoder_attention_mask")
    if cfg.instruct:
      text += ["qformer_input_ids", "qformer_attention_mask"]
  out = {"pixel_values": jax.ShapeDtypeStruct((b, size, size, 3), np.float32, sharding=sharding)}
  out.update({k: jax.ShapeDtypeStruct((b, w), np.int32, sharding=sharding) for k in text})
  return out
