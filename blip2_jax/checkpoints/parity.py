"""A checkpoint directory through transformers (eager attention) and through blip2_jax on the same random
image and text: max / mean abs diff per stage (vision, Q-Former, projection, LLM logits or retrieval
scores). `python -m blip2_jax.parity` (blip2_jax/cli/parity.py) prints it; tests use `compare`.

    rows = compare("blip2-opt-2.7b-dir")     # [(stage, max_abs_diff, mean_abs_diff, max_abs_value)]

Needs torch and transformers (`pip install -e .[test]`); imported inside `compare`, as the package
runs without them.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from blip2_jax.checkpoints import hf
from blip2_jax.core import errors

LLM_ARCHS = ("Blip2Model", "Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration")
DEFAULT_THRESHOLDS = {"float32": 1e-4, "bfloat16": 1.5e-1}


def _np(x):
  if hasattr(x, "detach"):
    return x.detach().float().numpy()
  return np.asarray(jnp.asarray(x, jnp.float32))


def make_inputs(config, batch: int = 2, text_len: int = 7, seed: int = 0, image_size=None):
  """Random NHWC pixels and right-padded text (row b has text_len - b tokens)."""
  rng = np.random.default_rng(seed)
  size = image_size or config.vision.image_size
  pixels = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  vocab = config.text.vocab_size if config.text is not None else config.qformer.vocab_size
  lo = 3  # keep away from special ids 0-2
  hi = vocab - 1
  if config.image_token_index is not None:
    hi = min(hi, config.image_token_index)
  ids = rng.integers(lo, hi, (batch, text_len)).astype(np.int64)
  mask = np.ones((batch, text_len), np.int64)
  for b in range(batch):
    n = max(text_len - b, 1)
    mask[b, n:] = 0
  qf_ids = rng.integers(lo, config.qformer.vocab_size - 1, (batch, 5)).astype(np.int64)
  qf_mask = np.ones_like(qf_ids)
  qf_mask[-1, 3:] = 0
  dec = rng.integers(lo, hi, (batch, 4)).astype(np.int64)
  return dict(pixel_values=pixels, input_ids=ids, attention_mask=mask, qformer_input_ids=qf_ids,
              qformer_attention_mask=qf_mask, decoder_input_ids=dec)


def _hf_forward(hf, config, inp, torch, interpolate=False):
  """Runs the torch model, returning {stage: array} with HF v5's placeholder layout undone."""
  arch = config.architecture
  px = torch.from_numpy(inp["pixel_values"]).permute(0, 3, 1, 2).contiguous()
  ids, mask = torch.from_numpy(inp["input_ids"]), torch.from_numpy(inp["attention_mask"])
  q = config.num_query_tokens
  out = {}
  with torch.no_grad():
    if arch in LLM_ARCHS:
      if config.image_token_index is None:
        raise errors.UsageError("config.image_token_index is unset: HF v5 then never inserts the query "
                                 "outputs, so there is nothing to compare the LLM against")
      img = torch.full((ids.shape[0], q), config.image_token_index, dtype=ids.dtype)
      kw = dict(pixel_values=px, input_ids=torch.cat([img, ids], 1),
                attention_mask=torch.cat([torch.ones_like(img), mask], 1),
                interpolate_pos_encoding=interpolate)
      if config.instruct:
        kw.update(qformer_input_ids=torch.from_numpy(inp["qformer_input_ids"]),
                  qformer_attention_mask=torch.from_numpy(inp["qformer_attention_mask"]))
      if config.is_encoder_decoder:
        kw["decoder_input_ids"] = torch.from_numpy(inp["decoder_input_ids"])
      r = hf(**kw)
      out["vision"] = r.vision_outputs.last_hidden_state
      out["qformer"] = r.qformer_outputs.last_hidden_state
      out["projection"] = hf.language_projection(r.qformer_outputs.last_hidden_state[:, :q])
      out["logits"] = r.logits
    elif arch == "Blip2ForImageTextRetrieval":
      for itm in (False, True):
        r = hf(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
        name = "itm" if itm else "itc"
        out[f"{name}_logits_per_image"] = r.logits_per_image
        if not itm:
          out["vision"] = r.vision_model_output.last_hidden_state
          out["image_embeds"], out["text_embeds"] = r.image_embeds, r.text_embeds
    elif arch == "Blip2VisionModelWithProjection":
      r = hf(pixel_values=px)
      out["vision"], out["image_embeds"] = r.last_hidden_state, r.image_embeds
    elif arch == "Blip2TextModelWithProjection":
      r = hf(input_ids=ids, attention_mask=mask)
      out["qformer"], out["text_embeds"] = r.last_hidden_state, r.text_embeds
  return {k: _np(v) for k, v in out.items()}


def _our_forward(model, params, config, inp, interpolate=False):
  arch = config.architecture
  j = {k: jnp.asarray(v) for k, v in inp.items()}
  v = {"params": params}
  out = {}
  if arch in LLM_ARCHS:
    kw = dict(pixel_values=j["pixel_values"], input_ids=j["input_ids"], attention_mask=j["attention_mask"],
              interpolate_pos_encoding=interpolate)
    if config.instruct:
      kw.update(qformer_input_ids=j["qformer_input_ids"], qformer_attention_mask=j["qformer_attention_mask"])
    if config.is_encoder_decoder:
      kw["decoder_input_ids"] = j["decoder_input_ids"]
    r = model.apply(v, **kw)
    out["vision"] = r["vision_outputs"]["last_hidden_state"]
    out["qformer"] = r["qformer_outputs"]["last_hidden_state"]
    out["projection"] = r["language_model_inputs"]
    out["logits"] = r["logits"]
  elif arch == "Blip2ForImageTextRetrieval":
    for itm in (False, True):
      r = model.apply(v, j["pixel_values"], j["input_ids"], j["attention_mask"],
                      use_image_text_matching_head=itm)
      name = "itm" if itm else "itc"
      out[f"{name}_logits_per_image"] = r["logits_per_image"]
      if not itm:
        out["vision"] = r["vision_outputs"]["last_hidden_state"]
        out["image_embeds"], out["text_embeds"] = r["image_embeds"], r["text_embeds"]
  elif arch == "Blip2VisionModelWithProjection":
    r = model.apply(v, j["pixel_values"])
    out["vision"], out["image_embeds"] = r["last_hidden_state"], r["image_embeds"]
  elif arch == "Blip2TextModelWithProjection":
    r = model.apply(v, j["input_ids"], j["attention_mask"])
    out["qformer"], out["text_embeds"] = r["last_hidden_state"], r["text_embeds"]
  return {k: _np(val) for k, val in out.items()}


def _valid(name, a, inp, config):
  """Drops padded positions, which carry no meaning (HF and we may fill them differently)."""
  if name == "logits" and not config.is_encoder_decoder:
    keep = np.concatenate([np.ones((a.shape[0], config.num_query_tokens), bool),
                           inp["attention_mask"].astype(bool)], 1)
    return a[keep]
  if name in ("qformer", "text_embeds") and config.architecture == "Blip2TextModelWithProjection":
    return a[inp["attention_mask"].astype(bool)]
  if name == "qformer" and config.instruct:
    return a  # instruction padding is inside the Q-Former sequence; HF pads the same way
  return a


def compare(hf_dir: str, dtype: str = "float32", batch: int = 2, seed: int = 0, scan: bool = False,
            image_size: int | None = None):
  """Returns [(stage, max_abs_diff, mean_abs_diff, max_abs_value)] for the two implementations.

  image_size other than the config's runs both sides with interpolated position embeddings
  (conditional-generation classes only)."""
  import torch
  import transformers

  model, params = hf.from_pretrained(hf_dir, dtype=jnp.dtype(dtype), scan=scan)
  config = model.config
  cls = getattr(transformers, config.architecture)
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  ref_model = cls.from_pretrained(hf_dir, attn_implementation="eager", dtype=tdtype).eval()
  inp = make_inputs(config, batch=batch, seed=seed, image_size=image_size)
  interpolate = image_size is not None and image_size != config.vision.image_size
  ref = _hf_forward(ref_model, config, inp, torch, interpolate)
  ours = _our_forward(model, params, config, inp, interpolate)
  rows = []
  for k in ref:
    a, b = _valid(k, ref[k], inp, config), _valid(k, ours[k], inp, config)
    if a.shape != b.shape:
      raise AssertionError(f"stage {k}: torch shape {a.shape} != ours {b.shape}")
    d = np.abs(a - b)
    rows.append((k, float(d.max()), float(d.mean()), float(np.abs(a).max())))
  return rows


TINY = {
    "opt": ("Blip2ForConditionalGeneration", "opt"),
    "t5": ("Blip2ForConditionalGeneration", "t5"),
    "llama": ("Blip2ForConditionalGeneration", "llama"),
    "retrieval": ("Blip2ForImageTextRetrieval", None),
    "instructblip": ("InstructBlipForConditionalGeneration", "t5"),
}
