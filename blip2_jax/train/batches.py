"""Host-side batch assembly: a data-pipeline batch (numpy) -> the model batch of each task.

Every array gets a fixed width (`max_txt_len`), so the train step compiles once.
  stage1 / retrieval: pixel_values + BERT input_ids / attention_mask (tokenised in the pipeline)
  stage2 / caption:   pixel_values + LLM input_ids / attention_mask / labels (losses.build_stage2_batch:
                      OPT caption + "\\n", LLaMA + EOS, T5 prefix-LM split), caption FT with a prompt
  instruct:           pixel_values + the instruction for the Q-Former (qformer_input_ids) and the LLM
                      (decoder-only: [instruction; response + EOS], loss on the response only;
                      T5: instruction to the encoder, response as the decoder target)
"""
from __future__ import annotations

import numpy as np

from blip2_jax.train import losses

IGNORE = losses.IGNORE
DEFAULT_INSTRUCTION = "Write a short description for the image."  # InstructBLIP captioning template


def fix_width(x: np.ndarray, width: int, fill) -> np.ndarray:
  """Pads (right) or truncates the last axis to `width`."""
  x = np.asarray(x)
  if x.shape[-1] >= width:
    return x[..., :width]
  pad = np.full(x.shape[:-1] + (width - x.shape[-1],), fill, x.dtype)
  return np.concatenate([x, pad], axis=-1)


def _pad_id(tok) -> int:
  return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def _fixed(batch: dict, width: int, pad: int) -> dict:
  fills = {"input_ids": pad, "attention_mask": 0, "labels": IGNORE, "decoder_attention_mask": 0,
           "qformer_input_ids": 0, "qformer_attention_mask": 0}
  return {k: fix_width(v, width, fills[k]).astype(np.int32) if k in fills else v for k, v in batch.items()}


def _rows(tok, texts, add_special_tokens=True):
  return tok(list(texts), add_special_tokens=add_special_tokens)["input_ids"]


def instruct_text(tok, family: str, instructions, responses, max_len: int) -> dict:
  """LLM side of an instruction batch (see the module docstring); right padded to max_len."""
  pad = _pad_id(tok)
  n = len(instructions)
  ids = np.full((n, max_len), pad, np.int32)
  mask = np.zeros((n, max_len), np.int32)
  if family == "t5":
    labels = np.full((n, max_len), IGNORE, np.int32)
    dmask = np.zeros((n, max_len), np.int32)
    for i, (a, b) in enumerate(zip(_rows(tok, instructions), _rows(tok, responses))):
      a, b = a[:max_len], b[:max_len]
      ids[i, :len(a)], mask[i, :len(a)] = a, 1
      labels[i, :len(b)], dmask[i, :len(b)] = b, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "decoder_attention_mask": dmask}
  labels = np.full((n, max_len), IGNORE, np.int32)
  for i, (a, b) in enumerate(zip(_rows(tok, instructions), _rows(tok, responses, add_special_tokens=False))):
    seq = (list(a) + list(b) + [tok.eos_token_id])[:max_len]
    ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
    labels[i, len(a):len(seq)] = seq[len(a):]
  return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_batch_fn(config, setup):
  """-> fn(pipeline_batch, np.random.Generator) -> model batch (numpy, fixed widths)."""
  task = config.task
  width = int(config.data.max_txt_len)
  family = setup.model.config.family

  if task in ("stage1", "retrieval"):
    def stage1(b, rng):
      return {"pixel_values": b["image"], "input_ids": b["input_ids"].astype(np.int32),
              "attention_mask": b["attention_mask"].astype(np.int32)}
    return stage1

  ltok, qtok = setup.llm_tokenizer, setup.qformer_tokenizer
  if task in ("stage2", "caption"):
    def lm(b, rng):
      text = losses.build_stage2_batch(ltok, [str(t) for t in b["text"]], family, prompt=config.loss.prompt,
                                       max_len=width, prefix_ratio=config.loss.t5_prefix_ratio, rng=rng)
      return dict(_fixed(text, width, _pad_id(ltok)), pixel_values=b["image"])
    return lm

  if task == "instruct":
    def instruct(b, rng):
      instr = [str(t) for t in b["instruction"]]
      out = instruct_text(ltok, family, instr, [str(t) for t in b["response"]], width)
      q = qtok(instr, padding="max_length", truncation=True, max_length=width, return_tensors="np")
      out.update(qformer_input_ids=q["input_ids"].astype(np.int32),
                 qformer_attention_mask=q["attention_mask"].astype(np.int32), pixel_values=b["image"])
      return out
    return instruct
  raise ValueError(f"unknown task {task!r}")


def instruct_fields(record: dict, rng) -> dict:
  """Pipeline text_fn for instruction data: {"instruction", "response"}; a caption-only record
  becomes (DEFAULT_INSTRUCTION, caption) (InstructBLIP's captioning template)."""
  if "instruction" in record:
    return {"instruction": record["instruction"], "response": record["response"]}
  cap = record.get("caption")
  if isinstance(cap, (list, tuple)):
    cap = cap[int(rng.integers(len(cap)))] if rng is not None else cap[0]
  if not isinstance(cap, str):
    raise ValueError(f"record has neither instruction/response nor caption: keys {sorted(record)}")
  return {"instruction": DEFAULT_INSTRUCTION, "response": cap}
