"""Hugging Face BLIP directories (model_type "blip") <-> `models.blip` composites.

`blip2_jax.from_pretrained` / `save_pretrained` (checkpoints/hf.py) hand BLIP checkpoints here:
`BlipForConditionalGeneration` (the captioner, e.g. Salesforce/blip-image-captioning-large / -base)
and `BlipForImageTextRetrieval` (the filter, Salesforce/blip-itm-large-coco / -base-coco). Loading
is strict through `models.blip.hf_rules` (a missing or unexpected tensor is an error); position_ids
buffers and the LM head's tied copies may be present (`models.blip.hf_ignore`).
"""
from __future__ import annotations

from blip2_jax.checkpoints import io
from blip2_jax.core import sharding as shd
from blip2_jax.models import blip


def load(path: str, hf_config, *, mesh=None, axis_rules=shd.DEFAULT_RULES, **runtime):
  """(model, params) from a BLIP directory whose transformers config is `hf_config`; `runtime`:
  dtype / param_dtype names, scan, remat, attn_impl (every tower). With a mesh, every tensor is
  placed into its sharding as read, as for BLIP-2."""
  config = blip.BlipConfig.from_hf(hf_config, **runtime)
  model = blip.build(config)
  params = io.load_params(path, blip.hf_rules(config), io.abstract_params(model, **blip.dummy_inputs(config)),
                          mesh=mesh, axis_rules=axis_rules, ignore=blip.hf_ignore(config), name=path)
  return model, params


def save(model, params, path: str, *, dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
  """config.json + safetensors that transformers' BlipFor*.from_pretrained loads. An untied LM head
  also gets HF's unused `cls.predictions.bias` (a copy of the decoder bias), so nothing is missing."""
  config = model.config
  tensors = io.to_state_dict(params, blip.hf_rules(config), dtype=dtype)
  head = "text_decoder.cls.predictions."
  if config.architecture == "BlipForConditionalGeneration" and not config.tie_word_embeddings:
    tensors[head + "bias"] = tensors[head + "decoder.bias"]
  io.save_hf_directory(path, tensors, config.to_hf(), dtype=dtype, max_shard_bytes=max_shard_bytes)
