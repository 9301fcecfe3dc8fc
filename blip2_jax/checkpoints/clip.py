"""HF `CLIPModel` directories <-> `models.clip.CLIPModel` (the CapFilt ranker).

`blip2_jax.from_pretrained` / `save_pretrained` (checkpoints/hf.py) hand a config.json of model_type
"clip" (`openai/clip-vit-large-patch14` and its kind) to `load` / `save`:

    model, params = blip2_jax.from_pretrained("openai/clip-vit-large-patch14")   # or a directory
    blip2_jax.save_pretrained(model, params, "out/clip")   # transformers' CLIPModel loads it

Loading is strict as for BLIP-2: every tensor is renamed through `models.clip.hf_rules`, and a
missing, unexpected or mis-shaped one is an error (the `position_ids` buffers older checkpoints
hold are the only tensors allowed without a rule). With a mesh, each tensor is placed straight into
its sharding from the modules' logical axis names.
"""
from __future__ import annotations

from blip2_jax.checkpoints import io
from blip2_jax.core import sharding as shd
from blip2_jax.models import clip


def load(path: str, hf_config, *, mesh=None, axis_rules=shd.DEFAULT_RULES,
         **runtime) -> tuple[clip.CLIPModel, dict]:
  """(model, params) from a checkpoint directory and its transformers CLIPConfig; `runtime`: dtype,
  param_dtype, scan, remat, attn_impl (names) for both towers."""
  config = clip.CLIPConfig.from_hf(hf_config, **runtime)
  model = clip.CLIPModel(config)
  abstract = io.abstract_params(model, **clip.dummy_inputs(config))
  params = io.load_params(path, clip.hf_rules(config), abstract, mesh=mesh, axis_rules=axis_rules,
                          ignore=clip.hf_ignore(config), name=path)
  return model, params


def save(model: clip.CLIPModel, params, path: str, *, dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
  """config.json + safetensors in HF's CLIPModel layout; `dtype` casts the floating tensors."""
  tensors = io.to_state_dict(params, clip.hf_rules(model.config), dtype=dtype)
  io.save_hf_directory(path, tensors, model.config.to_hf(), dtype=dtype, max_shard_bytes=max_shard_bytes)
