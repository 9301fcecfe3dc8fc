"""Shared pieces of the recipes: argument parsing, the base config, tiny (CPU) overrides.

A recipe is `configs/<name>.py` with `get_config(arg)`; `arg` is the text after the colon in
`--config configs/stage1.py:vit=g,tiny` (big_vision's convention): comma-separated `key=value`
pairs and bare flags (`tiny` = `tiny=True`). Unknown keys are an error that names them.
"""
from __future__ import annotations

import ml_collections

# LAVIS / paper facts (see ../shared/REFERENCE.md).
PAPER_ADAMW = dict(b1=0.9, b2=0.98, weight_decay=0.05)
FROZEN_VIT = r"model/vision_model/.*"
FROZEN_LLM = r"model/language_model/.*"


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`"vit=g,tiny"` -> ConfigDict(vit="g", tiny=True, ...other defaults); values take the default's type."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; this recipe takes {sorted(defaults)}")
    d = defaults[key]
    if not eq:
      if not isinstance(d, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(d, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r}: expected true / false")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(d, int):
      out[key] = int(value)
    elif isinstance(d, float):
      out[key] = float(value)
    else:
      out[key] = value
  return ml_collections.ConfigDict(out)


# LLM families a recipe's `llm=` may name without a released BLIP-2 (no preset shapes): the weights
# come from `model.language_model` (a directory or Hub id), or random with `tiny`.
LLM_FAMILIES = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3")


def pick_llm(c: ml_collections.ConfigDict, llm: str, llms: dict, presets: dict, batch: int) -> int:
  """Sets model.family / preset / language_model from a recipe's `llm=` and returns its batch size.

  `llm`: a key of `llms` (a released BLIP-2's LLM: its family, batch and preset shapes), an LLM
  family of LLM_FAMILIES (weights from `--config.model.language_model`, or random with `tiny`), or
  an LLM directory / Hub id ("Qwen/Qwen2.5-7B-Instruct": model.language_model, the family read from
  its config.json when the run starts). The last two train with `batch` and have no preset: the
  ahead-of-time compile needs model.hf_config for them."""
  if llm in llms:
    family, batch = llms[llm]
    c.model.family, c.model.preset = family, presets[llm]
  elif llm in LLM_FAMILIES:
    c.model.family = llm
  elif "/" in llm:
    c.model.language_model = llm
  else:
    raise ValueError(f"llm={llm!r}: choose one of {sorted(llms)}, a family of {list(LLM_FAMILIES)}, or an "
                     "LLM directory / Hub id (e.g. llm=Qwen/Qwen2.5-7B-Instruct)")
  return batch


def base(task: str) -> ml_collections.ConfigDict:
  """Fields every recipe has; recipes overwrite what differs."""
  c = ml_collections.ConfigDict()
  c.task = task  # stage1 | retrieval (stage-1 losses) | stage2 | caption | instruct (LM loss)
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.init = "towers"           # towers | pretrained | random
  c.model.architecture = "Blip2ForConditionalGeneration"
  c.model.family = ""               # opt | t5 | llama | qwen2 | qwen3 | mistral | gemma2 | gemma3 ("": read from the LLM)
  c.model.vision = ""               # HF BLIP-2 (or Blip2VisionModel) directory: the ViT
  c.model.qformer_bert = ""         # HF BERT directory: the Q-Former's initialisation
  c.model.language_model = ""       # HF LLM directory or Hub id (any family of models/registry.py)
  c.model.pretrained = ""           # a blip2-jax / HF BLIP-2 directory (fine-tuning, stage 2 from stage 1)
  c.model.hf_config = ml_collections.ConfigDict()  # random init: transformers Blip2Config kwargs
  c.model.preset = ""               # the released model's shapes (blip2_jax.models.presets), for `python -m blip2_jax.aot`
  c.model.num_query_tokens = 32
  c.model.cross_attention_frequency = 2
  c.model.init_scales = ()          # ((regex over parameter paths, factor), ...): scale starting values (towers init)
  c.model.image_size = 224
  c.model.dtype = "bfloat16"        # compute dtype of the ViT and LLM (Q-Former computes in float32 as HF)
  c.model.frozen_dtype = "bfloat16"  # storage dtype of frozen towers; trainable params stay float32
  c.model.scan = True
  c.model.remat = "full"            # none | full | dots (see models/layers.py)
  c.model.attn_impl = ml_collections.config_dict.placeholder(str)  # None: XLA picks; "cudnn" on GPU
  c.model.dropout = True            # the Q-Former's / LLM's dropout (0.1 in BERT) while training

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.qformer = ""          # BERT tokenizer directory ([DEC] is added as bos when missing)
  c.tokenizer.llm = ""              # LLM tokenizer directory (default: c.model.language_model / pretrained)

  c.frozen = [FROZEN_VIT, FROZEN_LLM]  # regexes over "/"-joined parameter paths of the training tree

  c.optim = ml_collections.ConfigDict(dict(lr=1e-4, min_lr=1e-5, warmup_steps=2000, warmup_init=1e-6,
                                           clip_norm=1.0, **PAPER_ADAMW))
  c.optim.lr_scales = ()            # ((regex over parameter paths, lr factor), ...): per-module multipliers
  c.total_steps = 0                 # 0: derived from num_epochs and the dataset size
  c.num_epochs = 0
  c.global_batch_size = 256
  c.accum_steps = 1

  c.loss = ml_collections.ConfigDict(dict(label_smoothing=0.1, itc_full_gradient=False, prompt="",
                                          t5_prefix_ratio=0.5))
  # stage 2 / caption, OPT and LLaMA: "lavis" masks LAVIS Blip2OPT's prompt_length, the prompt tokenised
  # as given: with a trailing space ("a photo of ") that is also the caption's first token (byte-level
  # BPE); "exact" masks the prompt's own tokens only. Equal for prompts without one ("a photo of").
  c.loss.prompt_mask = "lavis"
  # VQA / instruction prompts as a user turn of the LLM tokenizer's chat template (instruction-tuned
  # LLMs such as Qwen2.5-Instruct or Gemma IT; evaluation uses it too); False: raw, as BLIP-2 / InstructBLIP
  c.loss.chat_template = False

  c.data = ml_collections.ConfigDict()
  c.data.source = "annotations"     # annotations | array_record | tfds | shapes
  c.data.annotations = ""           # LAVIS / COCO json or JSONL ({"image", "caption"}), paths under images_dir
  c.data.images_dir = ""
  c.data.array_record = ""          # ArrayRecord shards: a convert prefix, a glob, a directory, or a CapFilt
                                    # output directory (its complete shards; one kept caption drawn per step)
  c.data.tfds_name = ""
  c.data.tfds_split = "train"
  c.data.tfds_data_dir = ml_collections.config_dict.placeholder(str)
  c.data.num_records = 0            # shapes: how many synthetic scenes (eval: the held-out test split)
  c.data.eval_annotations = ""      # held-out LAVIS / COCO / JSONL caption file for in-training eval
  c.data.eval_images_dir = ""       # default: data.images_dir
  c.data.max_txt_len = 32
  c.data.max_words = 50
  c.data.worker_count = 0
  c.data.augment = True             # RandomResizedCrop(0.5-1) + flip as BLIP-2; False: resize only

  c.eval_every = 0                  # -1: never; 0: only at the end; N: every N steps and at the end
  c.eval = ml_collections.ConfigDict(dict(num_records=32, batch_size=16, max_new_tokens=20, num_beams=1,
                                          k=16, num_examples=4))  # held-out images (0 = all of the file)

  c.mesh = (-1, 1, 1)               # (data, fsdp, tensor); one -1 takes the remaining devices
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.export_hf = True                # write the final params as a HF directory (workdir/hf)
  return c


def tiny(c: ml_collections.ConfigDict, family: str | None) -> ml_collections.ConfigDict:
  """Shrinks a recipe to a random-init model and synthetic scenes that train on a CPU in seconds."""
  from blip2_jax.checkpoints import tiny
  hf = tiny.tiny_blip2_config(family, instruct=c.task == "instruct")
  c.model.init = "random"
  c.model.preset = ""  # shapes come from hf_config
  c.model.hf_config = ml_collections.ConfigDict(hf.to_dict())
  c.model.image_size = hf.vision_config.image_size
  c.model.num_query_tokens = hf.num_query_tokens
  c.model.dtype = "float32"
  c.model.frozen_dtype = "float32"
  c.model.scan = True  # also compiles ~2x faster than unrolled layers
  c.model.remat = "none"
  c.tokenizer.qformer = "tiny:bert"
  c.tokenizer.llm = f"tiny:{family}" if family else ""
  c.data.source = "shapes"
  c.data.augment = False  # flips and crops would falsify "at the top left" / "three circles"
  c.data.num_records = 64
  c.data.max_txt_len = 12
  c.global_batch_size = 8
  c.total_steps = 40
  c.num_epochs = 0
  c.optim.update(lr=2e-3, min_lr=1e-4, warmup_steps=2, warmup_init=1e-4)  # a random tiny model learns fast
  c.log_every = 10
  c.checkpoint_every = 20
  c.keep_checkpoints = 2
  return c
