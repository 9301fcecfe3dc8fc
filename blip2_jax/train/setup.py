"""Builds what a training run starts from: the model, its training parameter tree, the tokenizers.

Training trees (what the optimizer and checkpoints see; frozen-parameter regexes match their
"/"-joined paths):
  stage-1 tasks (stage1, retrieval): {"model": Blip2ForImageTextRetrieval params,
                                      "qformer_lm_head": QFormerLMHead params, "temp": ()}
  LM tasks (stage2, caption, instruct): {"model": Blip2ForConditionalGeneration params}
Initialisation (`config.model.init`):
  towers      stage 1: ViT from a BLIP-2 / vision directory + Q-Former from BERT (checkpoints.towers);
              stage 2: ViT, query tokens and Q-Former from a stage-1 directory (`model.pretrained`)
              + the LLM from its own directory (`model.language_model`); projections fresh.
  pretrained  a blip2-jax / HF BLIP-2 directory (stage-1 tasks also read qformer_lm_head.safetensors).
  random      a transformers config (`model.hf_config`), random weights: the `tiny` recipes.
`model.image_size` different from the checkpoint's resizes the ViT position embeddings once,
bicubically (as LAVIS `interpolate_pos_embed` for 364 / 490 px fine-tuning).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from blip2_jax.checkpoints import hf, io, tiny, towers
from blip2_jax.data import processing
from blip2_jax.models import blip2, presets, qformer, vit
from blip2_jax.train import optim, tasks

TEMP_INIT = 0.07  # LAVIS Blip2Qformer.temp


@dataclasses.dataclass
class Setup:
  model: Any                # the flax composite
  params: dict              # the training tree (see module docstring)
  qformer_tokenizer: Any    # BERT tokenizer ([DEC] bos) for stage-1 text / InstructBLIP instructions
  llm_tokenizer: Any        # None for stage-1 tasks
  report: dict              # where each part came from


def _runtime(config) -> dict:
  m = config.model
  return dict(dtype=m.dtype, param_dtype="float32", scan=bool(m.scan), remat=m.remat, attn_impl=m.attn_impl)


def load_tokenizer(spec: str, what: str):
  """A tokenizer directory, or "tiny:<family>" for the word-level test tokenizers."""
  if not spec:
    raise ValueError(f"config.tokenizer.{what} is empty: set it to a tokenizer directory")
  if spec.startswith("tiny:"):
    return tiny.tiny_tokenizer(spec.split(":", 1)[1])
  return processing.load_tokenizer(spec)


def _qformer_tokenizer(spec: str, vocab_size: int):
  tok = load_tokenizer(spec, "qformer")
  if tok.bos_token_id is None:  # LAVIS init_tokenizer: BertTokenizer + [DEC] as bos
    tok.add_special_tokens({"bos_token": "[DEC]"})
  if len(tok) > vocab_size:
    raise ValueError(f"the Q-Former tokenizer has {len(tok)} tokens but the Q-Former's vocabulary holds "
                     f"{vocab_size}")
  return tok


def _take_like(src, like):
  """The subtree of `src` with `like`'s keys (e.g. a stage-1 Q-Former without its text FFN)."""
  if isinstance(like, dict):
    missing = [k for k in like if k not in src]
    if missing:
      raise KeyError(f"missing {missing}")
    return {k: _take_like(src[k], like[k]) for k in like}
  return src


def resize_positions(config, params, image_size: int):
  """(config, params) for `image_size`: ViT position embeddings resized bicubically (torch-exact)."""
  v = config.vision
  if image_size == v.image_size:
    return config, params
  if image_size % v.patch_size:
    raise ValueError(f"model.image_size {image_size} is not a multiple of the patch size {v.patch_size}")
  g_old, g_new = v.image_size // v.patch_size, image_size // v.patch_size
  pos = params["vision_model"]["embeddings"]["position_embedding"]
  d = pos.shape[-1]
  grid = vit.resize_bicubic(jnp.asarray(pos[0, 1:]).reshape(g_old, g_old, d), (g_new, g_new))
  new = jnp.concatenate([jnp.asarray(pos[0, :1], jnp.float32), grid.reshape(g_new * g_new, d)])[None]
  params = dict(params, vision_model=dict(params["vision_model"], embeddings=dict(
      params["vision_model"]["embeddings"], position_embedding=new.astype(pos.dtype))))
  return dataclasses.replace(config, vision=dataclasses.replace(v, image_size=image_size)), params


def _stage1_extras(model, seed: int, head=None, temp=None) -> dict:
  if head is None:
    q = model.config.qformer
    head = io.init_params(qformer.QFormerLMHead(q), seed, *qformer.init_args(q)[0])
  return {"qformer_lm_head": head, "temp": jnp.asarray(TEMP_INIT if temp is None else temp, jnp.float32)}


def _random(config):
  import transformers

  d = config.model.hf_config.to_dict() if hasattr(config.model.hf_config, "to_dict") else dict(config.model.hf_config)
  if not d:
    raise ValueError("model.init='random' needs model.hf_config (a transformers Blip2Config as a dict)")
  cls = transformers.InstructBlipConfig if d.get("model_type") == "instructblip" else transformers.Blip2Config
  cfg = blip2.Blip2Config.from_hf(cls(**d), architecture=config.model.architecture, **_runtime(config))
  model = blip2.build(cfg)
  params = io.init_params(model, config.seed, **blip2.dummy_inputs(cfg))
  return cfg, params, {"init": f"random (seed {config.seed})"}


def _towers_stage1(config):
  m = config.model
  for k in ("vision", "qformer_bert"):
    if not m[k]:
      raise ValueError(f"model.init='towers' for stage 1 needs model.{k} (a directory)")
  cfg = towers.config_from_towers(m.vision, m.qformer_bert, None, architecture=m.architecture,
                                  num_query_tokens=m.num_query_tokens,
                                  cross_attention_frequency=m.cross_attention_frequency, **_runtime(config))
  _, params, report = towers.init_from_towers(cfg, vision=m.vision, qformer_bert=m.qformer_bert, seed=config.seed)
  return cfg, params, report


def _towers_stage2(config):
  """Stage 2 from a stage-1 directory (ViT, query tokens, Q-Former) + an LLM directory."""
  m = config.model
  if not m.pretrained or not m.language_model:
    raise ValueError("stage 2 with model.init='towers' needs model.pretrained (the stage-1 directory) and "
                     "model.language_model (the HF LLM directory)")
  rt = _runtime(config)
  # read with this run's layout (scanned or per-layer), so the copied subtrees fit the new model
  s1_model, s1_params = hf.from_pretrained(m.pretrained, **{k: v for k, v in rt.items() if k != "param_dtype"},
                                           param_dtype=jnp.float32)
  s1 = s1_model.config
  if s1.text is not None:
    raise ValueError(f"model.pretrained {m.pretrained} already has a language model ({s1.architecture}); "
                     "use model.init='pretrained' to continue training it")
  text = towers.text_config_from_dir(m.language_model, **rt)
  qcfg = dataclasses.replace(s1.qformer, use_qformer_text_input=False)  # LAVIS stage 2 drops the text FFN
  cfg = blip2.Blip2Config(vision=s1.vision, qformer=qcfg, text=text, num_query_tokens=s1.num_query_tokens,
                          architecture="Blip2ForConditionalGeneration",
                          initializer_range=s1.initializer_range).replace_runtime(**rt)
  model, params, report = towers.init_from_towers(cfg, language_model=m.language_model, seed=config.seed)
  for k in ("vision_model", "query_tokens", "qformer"):
    params[k] = _take_like(s1_params[k], params[k])
    report["copied"].append(f"{k}.* [{m.pretrained}]")
  return cfg, params, report


def scale_init(params, rules):
  """`model.init_scales`: ((regex, factor), ...) multiplies the starting value of every parameter whose
  "/"-joined path (as in `frozen`, without the leading "model/") fully matches a regex by its factor,
  e.g. a sharper start for the fresh cross-attention (("qformer/.*crossattention/attention/(query|key)/kernel",
  4.0),). A regex that matches nothing is an error, so a typo cannot pass silently."""
  rules = [tuple(x) for x in rules]
  if not rules:
    return params
  factor = optim.path_lr_scales(rules, what="model.init_scales")
  optim.require_matches([r for r, _ in rules], params, "model.init_scales:")

  def scale(kp, x):
    f = factor(optim.path_of(kp), x)
    return x if f == 1.0 else x * f
  return jax.tree_util.tree_map_with_path(scale, params)


def _check_model(task: tasks.Task, cfg) -> None:
  if task.stage1 and cfg.architecture != "Blip2ForImageTextRetrieval":
    raise ValueError(f"task {task.name!r} trains a Blip2ForImageTextRetrieval; the model is a {cfg.architecture}")
  if not task.stage1 and cfg.text is None:
    raise ValueError(f"task {task.name!r} needs a model with a language model; {cfg.architecture} has none")


def build(config) -> Setup:
  """The model, training tree and tokenizers that `config` describes (see the module docstring)."""
  task, init = tasks.get(config.task), config.model.init
  head = temp = None
  if init == "random":
    cfg, params, report = _random(config)
  elif init == "towers":
    cfg, params, report = (_towers_stage1 if task.stage1 else _towers_stage2)(config)
    head = report.pop("qformer_lm_head", None)
  elif init == "pretrained":
    if not config.model.pretrained:
      raise ValueError("model.init='pretrained' needs model.pretrained (a BLIP-2 directory)")
    model, params = hf.from_pretrained(config.model.pretrained, **{k: v for k, v in _runtime(config).items()
                                                                     if k != "param_dtype"}, param_dtype=jnp.float32)
    cfg, report = model.config, {"init": f"pretrained {config.model.pretrained}"}
    if task.stage1:
      head, temp = hf.load_qformer_head(config.model.pretrained, model)
  else:
    raise ValueError(f"model.init {init!r}: choose towers, pretrained or random")

  _check_model(task, cfg)
  if init == "towers":
    params = scale_init(params, config.model.get("init_scales", ()))
  cfg, params = resize_positions(cfg, params, int(config.model.image_size))
  model = blip2.build(cfg)
  tree = {"model": params}
  if task.stage1:
    tree.update(_stage1_extras(model, config.seed, head, temp))
  qtok = None
  if task.stage1 or cfg.instruct:
    qtok = _qformer_tokenizer(config.tokenizer.qformer, cfg.qformer.vocab_size)
  ltok = None
  if not task.stage1:
    spec = config.tokenizer.llm or config.model.language_model or config.model.pretrained
    ltok = load_tokenizer(spec, "llm")
  return Setup(model, tree, qtok, ltok, report)


# ----------------------------------------------------------------------------------------
# abstract: shapes only


def _hf_shapes(config):
  """The transformers config of `model.preset` (a released model, blip2_jax.models.presets) or `model.hf_config`."""
  import transformers

  m = config.model
  if m.get("preset"):
    return presets.hf_config(m.preset, num_query_tokens=int(m.num_query_tokens))
  d = m.hf_config.to_dict() if hasattr(m.hf_config, "to_dict") else dict(m.hf_config)
  if not d:
    raise ValueError("an abstract build needs model.preset (a released model's shapes: "
                     f"{', '.join(sorted(presets.PRESETS))}) or model.hf_config")
  cls = transformers.InstructBlipConfig if d.get("model_type") == "instructblip" else transformers.Blip2Config
  return cls(**d)


def build_abstract(config) -> Setup:
  """The Setup `build(config)` gives, with jax.ShapeDtypeStruct parameters and no tokenizers: no
  weights are read or initialised. The shapes come from `model.preset` (or `model.hf_config` for
  the tiny recipes), so a recipe's train step compiles ahead of time for hardware it does not run on
  (`python -m blip2_jax.aot`)."""
  import jax

  task = tasks.get(config.task)
  cfg = blip2.Blip2Config.from_hf(_hf_shapes(config), architecture=config.model.architecture, **_runtime(config))
  _check_model(task, cfg)
  size = int(config.model.image_size)
  if size % cfg.vision.patch_size:
    raise ValueError(f"model.image_size {size} is not a multiple of the patch size {cfg.vision.patch_size}")
  # the position table for `size` is what resize_positions would give: only its shape matters here
  cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=size))
  model = blip2.build(cfg)

  def init():
    tree = {"model": io.init_params(model, config.seed, **blip2.dummy_inputs(cfg))}
    if task.stage1:
      tree.update(_stage1_extras(model, config.seed))
    return tree
  source = f"preset {config.model.preset}" if config.model.get("preset") else "model.hf_config"
  return Setup(model, jax.eval_shape(init), None, None, {"init": f"abstract ({source})"})
