"""Hugging Face BLIP directories (model_type "blip") <-> `models.blip` composites.

`blip2_jax.from_pretrained` / `save_pretrained` (checkpoints/hf.py) hand BLIP checkpoints here:
`BlipForConditionalGeneration` (the captioner, e.g. Salesforce/blip-image-captioning-large / -base)
and `BlipForImageTextRetrieval` (the filter, Salesforce/blip-itm-large-coco / -base-coco). Loading
is strict through `models.blip.hf_rules` (a missing or unexpected tensor is an error); position_ids
buffers and the LM head's tied copies may be present (`models.blip.hf_ignore`).
"""
from __future__ import annotations

import time

import jax

from blip2_jax.checkpoints import io
from blip2_jax.models import blip


def is_blip(model) -> bool:
  return isinstance(getattr(model, "config", None), blip.BlipConfig)


def from_pretrained(path: str, hf_config, *, mesh=None, axis_rules=None, verbose: bool = False, **runtime):
  """(model, params) from a BLIP directory whose transformers config is `hf_config`; `runtime`:
  dtype / param_dtype names, scan, remat, attn_impl (every tower). With a mesh, every tensor is
  placed into its sharding as read, as for BLIP-2."""
  t0 = time.time()
  config = blip.BlipConfig.from_hf(hf_config, **runtime)
  model = blip.build(config)
  params = io.load_params(path, blip.hf_rules(config), io.abstract_params(model, **blip.dummy_inputs(config)),
                          mesh=mesh, axis_rules=axis_rules, ignore=blip.hf_ignore(config), name=path)
  if verbose:
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"loaded {config.architecture} ({n / 1e6:.1f}M parameters) from {path} in {time.time() - t0:.1f}s")
  return model, params


def save_pretrained(model, params, path: str, *, dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
  """config.json + safetensors that transformers' BlipFor*.from_pretrained loads. An untied LM head
  also gets HF's unused `cls.predictions.bias` (a copy of the decoder bias), so nothing is missing."""
  config = model.config
  tensors = io.to_state_dict(params, blip.hf_rules(config), dtype=dtype)
  head = "text_decoder.cls.predictions."
  if config.architecture == "BlipForConditionalGeneration" and not config.tie_word_embeddings:
    tensors[head + "bias"] = tensors[head + "decoder.bias"]
  io.save_state_dict(path, tensors, max_shard_bytes=max_shard_bytes)
  hf_cfg = config.to_hf()
  hf_cfg.dtype = tensors["vision_model.embeddings.patch_embedding.weight"].dtype.name  # as transformers records it
  hf_cfg.save_pretrained(path)
