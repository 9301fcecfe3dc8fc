"""Hugging Face checkpoint directories <-> BLIP-2 composites (and BLIP / CLIP, through
checkpoints/blip.py / clip.py): `from_pretrained`, `save_pretrained`."""
from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings

import jax
import jax.numpy as jnp

from blip2_jax.checkpoints import blip as blip_io
from blip2_jax.checkpoints import clip as clip_io
from blip2_jax.checkpoints import io
from blip2_jax.core import hub
from blip2_jax.core import sharding as shd
from blip2_jax.models import blip, blip2, clip, qformer

CONFIG_NAME = "config.json"
# config.json model_types read here: BLIP-2 composites here, the CapFilt models in their own modules
_OTHER_MODELS = {"blip": blip_io, "clip": clip_io}
MODEL_TYPES = ("blip-2", "instructblip", *_OTHER_MODELS)


def read_hf_config(path: str):
  """The transformers config of a checkpoint directory, with errors that name the problem."""
  import transformers
  cfg_path = os.path.join(path, CONFIG_NAME)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory (expected a save_pretrained directory)")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; is it a save_pretrained directory?")
  try:
    with open(cfg_path) as f:
      raw = json.load(f)
  except ValueError as e:
    raise io.CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
  if not isinstance(raw, dict):
    raise io.CheckpointError(f"{cfg_path} holds a JSON {type(raw).__name__}, not an object")
  model_type = raw.get("model_type")
  if model_type not in MODEL_TYPES:
    arch = raw.get("architectures")
    raise io.CheckpointError(
        f"{path} holds a {model_type!r} checkpoint (architectures {arch}), not a BLIP-2 / InstructBLIP "
        "/ BLIP / CLIP one. To start a composite from separate towers use blip2_jax.checkpoints.towers.")
  return transformers.AutoConfig.for_model(**raw)


def _dtype_name(dtype) -> str | None:
  return None if dtype is None else jnp.dtype(dtype).name


def from_pretrained(path: str, dtype=jnp.float32, mesh=None, *, param_dtype=None, scan: bool = False,
                    remat: str = "none", attn_impl: str | None = None, qformer_dtype="float32",
                    axis_rules=shd.DEFAULT_RULES, verbose: bool = False, revision: str | None = None,
                    cache_dir: str | None = None, token=None):
  """Loads a transformers `save_pretrained` directory of any BLIP-2 class, or of BLIP's captioner /
  filter or CLIPModel (the CapFilt models: `models.blip` / `models.clip`, through checkpoints/blip.py /
  clip.py; `qformer_dtype` does not apply); returns (model, params).

  path: a local directory, or a Hugging Face Hub id ("Salesforce/blip2-opt-2.7b") at `revision`,
  fetched into (or, offline, read from) huggingface_hub's cache (`cache_dir`, `token`: see `blip2_jax.core.hub`).

  dtype: compute dtype of the ViT and LLM; param_dtype: their stored dtype (default: dtype).
  The Q-Former and query tokens compute in `qformer_dtype` with float32 params, as HF keeps them.
  mesh: with a `jax.sharding.Mesh`, every tensor is placed straight into its sharding as read
  (each device reads only its block); a dimension its mesh axes do not divide is replicated over
  them instead, with a warning (see `sharding.fit_spec`).
  """

  t0 = time.time()
  path = hub.resolve(path, revision=revision, cache_dir=cache_dir, token=token)
  hf_cfg = read_hf_config(path)
  param_dtype = param_dtype if param_dtype is not None else dtype
  runtime = dict(dtype=_dtype_name(dtype), param_dtype=_dtype_name(param_dtype), scan=scan, remat=remat,
                 attn_impl=attn_impl)
  if hf_cfg.model_type in _OTHER_MODELS:
    model, params = _OTHER_MODELS[hf_cfg.model_type].load(path, hf_cfg, mesh=mesh, axis_rules=axis_rules, **runtime)
  else:
    model, params = _load_blip2(path, hf_cfg, _dtype_name(qformer_dtype), runtime, mesh, axis_rules)
  if verbose:
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"loaded {model.config.architecture} ({n / 1e6:.1f}M parameters) from {path} in {time.time() - t0:.1f}s")
  return model, params


def _load_blip2(path: str, hf_cfg, qformer_dtype, runtime: dict, mesh, axis_rules):
  config = blip2.Blip2Config.from_hf(hf_cfg, qformer_dtype=qformer_dtype, **runtime)
  reader = io.open_checkpoint(path)
  config = fit_to_checkpoint(config, reader)
  model = blip2.build(config)
  abstract = io.abstract_params(model, **blip2.dummy_inputs(config))
  params = io.load_params(reader, blip2.hf_rules(config), abstract, mesh=mesh, axis_rules=axis_rules,
                          ignore=blip2.hf_ignore(config), name=path)
  return model, params


def save_pretrained(model, params, path: str, *, dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes config.json + safetensors in the HF layout, loadable by transformers' from_pretrained.

  A vision `post_layernorm_eps` other than the vision `layer_norm_eps` (LAVIS's `ln_vision`, 1e-5,
  after `checkpoints.lavis.load_lavis`) is written as an extra `vision_config.post_layernorm_eps` key:
  `from_pretrained` reads it back; transformers loads the directory but computes that norm with
  `layer_norm_eps` (it has no such field), and a warning says so."""
  config = model.config
  for config_cls, module in ((blip.BlipConfig, blip_io), (clip.CLIPConfig, clip_io)):
    if isinstance(config, config_cls):
      return module.save(model, params, path, dtype=dtype, max_shard_bytes=max_shard_bytes)
  tensors = io.to_state_dict(params, blip2.hf_rules(config), dtype=dtype)
  _warn_post_eps(config, path)
  io.save_hf_directory(path, tensors, config.to_hf(), dtype=dtype, max_shard_bytes=max_shard_bytes)


def _warn_post_eps(config, path: str) -> None:
  vision = getattr(config, "vision", None)
  if config.architecture == "Blip2TextModelWithProjection" or vision is None:
    return
  if vision.post_eps != vision.layer_norm_eps:
    warnings.warn(f"{path}: vision post_layernorm eps {vision.post_eps:g} (LAVIS's ln_vision) is stored as "
                  f"vision_config.post_layernorm_eps; blip2_jax reads it back, transformers ignores it and "
                  f"computes that norm with layer_norm_eps {vision.layer_norm_eps:g}", stacklevel=3)


# ----------------------------------------------------------------------------------------
# stage-1 extras: the Q-Former LM head (ITG) and the ITC temperature

QFORMER_HEAD_NAME = "qformer_lm_head.safetensors"
_HEAD_PREFIX = "cls.predictions."


def save_qformer_head(path: str, model, lm_head_params, temp=None) -> str:
  """Writes the Q-Former LM head (BERT `cls.predictions.*` names; tied head: no decoder weight)
  and, if given, the ITC temperature (`temp`, a scalar as LAVIS) to `path/qformer_lm_head.safetensors`.
  HF BLIP-2 classes have no slot for either, so they live beside the HF files; transformers
  ignores the file. Returns the file path."""
  import numpy as np
  tied = "decoder" not in lm_head_params
  tensors = io.to_state_dict(lm_head_params, qformer.lm_head_hf_rules(model.config.qformer, tied, _HEAD_PREFIX))
  if temp is not None:
    tensors["temp"] = np.asarray(jax.device_get(temp), np.float32).reshape(())
  os.makedirs(path, exist_ok=True)
  out = os.path.join(path, QFORMER_HEAD_NAME)
  io.write_safetensors(out, tensors)
  return out


def has_qformer_head(path: str) -> bool:
  return os.path.isfile(os.path.join(path, QFORMER_HEAD_NAME))


def load_qformer_head(path: str, model):
  """-> (lm_head_params, temp or None) from `path/qformer_lm_head.safetensors` (see save_qformer_head).

  Raises FileNotFoundError saying where the head comes from when the file is absent (HF's
  Blip2ForImageTextRetrieval checkpoints do not ship one)."""
  path = hub.resolve(path)
  f = os.path.join(path, QFORMER_HEAD_NAME)
  if not os.path.isfile(f):
    raise FileNotFoundError(
        f"{path} has no {QFORMER_HEAD_NAME}: the Q-Former LM head (ITG, for stage-1 captioning) is not part "
        "of HF's Blip2ForImageTextRetrieval checkpoints. It is written by stage-1 training, by "
        "checkpoints.hf.save_qformer_head(dir, model, report['qformer_lm_head']) after checkpoints.towers, or "
        "from a LAVIS checkpoint's extras (checkpoints.lavis.qformer_head_params)")
  reader = io.SafetensorsReader(f)
  keys = set(reader.keys())
  tied = _HEAD_PREFIX + "decoder.weight" not in keys
  cfg = model.config.qformer
  head = qformer.QFormerLMHead(cfg, tied)
  abstract = io.abstract_params(head, *qformer.init_args(cfg)[0])
  params = io.load_params(reader, qformer.lm_head_hf_rules(cfg, tied, _HEAD_PREFIX), abstract,
                          ignore=[r"temp", r"cls\.predictions\.decoder\.bias"], name=f)
  temp = jnp.asarray(reader.get("temp"), jnp.float32) if "temp" in keys else None
  return params, temp


def fit_to_checkpoint(config: blip2.Blip2Config, reader) -> blip2.Blip2Config:
  """Settings that transformers reads from the weights rather than config.json: a T5 head is
  untied exactly when the checkpoint holds `language_model.lm_head.weight` (transformers 5)."""
  if config.family == "t5":
    tied = not io.has_lm_head(reader, prefix="language_model.")
    return dataclasses.replace(config, text=dataclasses.replace(config.text, tie_word_embeddings=tied))
  return config
