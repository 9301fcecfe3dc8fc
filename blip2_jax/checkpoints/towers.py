"""Composite initialisation from separate towers, as a BLIP-2 stage-1 or stage-2 run starts.

    config = config_from_towers(vit_dir, bert_dir, opt_dir)     # no hand-written Blip2Config
    model, params, report = init_from_towers(config, vision=vit_dir, qformer_bert=bert_dir,
                                             language_model=opt_dir, seed=0)

Sources (HF `save_pretrained` directories, or `.bin` / safetensors files where noted):
  vision          any BLIP-2 / InstructBLIP checkpoint (only `vision_model.*` is read) or a
                  Blip2VisionModel directory (keys without the prefix).
  qformer_bert    a BERT directory (BertModel / BertForMaskedLM / BertForPreTraining, with or
                  without `bert.`): `bert.from_bert_state_dict` (query FFN = copy of the text
                  FFN, fresh cross-attention, vocab grown by `[DEC]`).
  language_model  OPTForCausalLM / T5ForConditionalGeneration / LlamaForCausalLM /
                  Qwen2ForCausalLM / Qwen3ForCausalLM / MistralForCausalLM / Gemma2ForCausalLM /
                  Gemma3ForCausalLM, or a Gemma 3 composite (Gemma3ForConditionalGeneration: its
                  text model, `language_model.model.*`; the vision tower is left out).
Each may also be a Hugging Face Hub id ("google-bert/bert-base-uncased"), resolved to its cached
snapshot (blip2_jax.core.hub). Everything else (query tokens N(0, initializer_range), language / vision /
text projections, itm_head, and any tower not given) is freshly initialised by `build(config).init`
with `seed`.

The Q-Former LM head (BERT `cls.predictions`, for ITG) has no slot in any HF BLIP-2 class, so
it is returned in `report["qformer_lm_head"]` (a param tree for `qformer.QFormerLMHead(
config.qformer)`, tied to `params["embeddings"]["word_embeddings"]["embedding"]`); training keeps
it next to the composite params. It exists only when the Q-Former takes text (retrieval / text
models, InstructBLIP); stage-2 composites drop BERT's text embeddings, text FFN and head as
LAVIS does (listed in `report["unused"]`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from blip2_jax.checkpoints import bert, io
from blip2_jax.core import hub
from blip2_jax.core import sharding as shd
from blip2_jax.core.naming import expand, prefixed
from blip2_jax.models import blip2, gemma, qformer, registry, vit
from blip2_jax.models import layers as L

_TEXT_TYPES = tuple(t for f in registry.FAMILIES.values() for t in f.model_types)
GEMMA3_COMPOSITE = "gemma3"  # model_type of Gemma3ForConditionalGeneration


# ----------------------------------------------------------------------------------------
# config


def _read_json(path: str, what: str) -> dict:
  f = os.path.join(path, "config.json")
  if not os.path.isdir(path) or not os.path.exists(f):
    raise FileNotFoundError(f"{what} tower {path!r} is not a save_pretrained directory (no config.json)")
  with open(f) as fh:
    return json.load(fh)


def _vision_source(path: str) -> tuple[dict, str]:
  """(vision config dict, key prefix of the vision weights) of a BLIP-2 / vision directory."""
  raw = _read_json(path, "vision")
  mt = raw.get("model_type")
  if mt in ("blip-2", "instructblip"):
    return raw["vision_config"], "vision_model."
  if mt in ("blip_2_vision_model", "instructblip_vision_model"):
    return raw, ""
  raise io.CheckpointError(f"vision tower {path!r} holds a {mt!r} checkpoint; expected a BLIP-2 / "
                           "InstructBLIP model or a Blip2VisionModel")


def _auto_config(path: str, what: str, allowed):
  import transformers
  raw = _read_json(path, what)
  mt = raw.get("model_type")
  if mt not in allowed:
    raise io.CheckpointError(f"{what} tower {path!r} holds a {mt!r} checkpoint (architectures "
                             f"{raw.get('architectures')}); expected one of {sorted(allowed)}")
  return transformers.AutoConfig.for_model(**raw)


def text_config_from_dir(llm_dir: str, **runtime):
  """Our text config (any registry family) of an HF LLM directory or Hub id (T5 head tying read
  from the weights)."""
  llm_dir = hub.resolve(llm_dir)
  hf = _auto_config(llm_dir, "language_model", _TEXT_TYPES)
  family = registry.family_of_model_type(hf.model_type)
  if family.name == "t5":
    return family.config_cls.from_hf(hf, tie_word_embeddings=not io.has_lm_head(llm_dir), **runtime)
  return family.config_cls.from_hf(hf, **runtime)


def config_from_towers(vision_dir: str, bert_dir: str, llm_dir: str | None = None, *,
                       architecture: str | None = None, num_query_tokens: int = 32,
                       cross_attention_frequency: int = 2, image_text_hidden_size: int = 256,
                       image_token_index: int | None = None, qformer_dtype: str | None = "float32",
                       **runtime):
  """The Blip2Config of a composite built from towers, derived from their config.json files.

  architecture: default Blip2ForConditionalGeneration with an LLM, Blip2ForImageTextRetrieval
  without. image_token_index: the LLM id of HF v5's `<image>` placeholder (None: unset; HF then
  does not insert the queries, which matters only when running the saved model in transformers).
  runtime (dtype, param_dtype, scan, remat, attn_impl) applies to every tower; the Q-Former
  computes in `qformer_dtype` with float32 params (as `Blip2Config.from_hf`).
  """
  L.check_runtime(runtime)
  arch = architecture or ("Blip2ForConditionalGeneration" if llm_dir else "Blip2ForImageTextRetrieval")
  kind = registry.architecture(arch).composite  # ValueError naming the supported ones
  generative = registry.can(arch, registry.LM)
  if generative and llm_dir is None:
    raise ValueError(f"{arch} needs a language model: pass llm_dir")
  if not generative and llm_dir is not None:
    raise ValueError(f"{arch} has no language model; drop llm_dir")
  instruct = arch.startswith("InstructBlip")
  vision_dir, bert_dir = hub.resolve(vision_dir), hub.resolve(bert_dir)
  vision_raw, _ = _vision_source(vision_dir)
  vision = vit.VisionConfig.from_hf(vision_raw, **runtime)
  bert = _auto_config(bert_dir, "qformer_bert", ("bert",))
  q_runtime = dict(runtime)
  if qformer_dtype is not None:
    q_runtime.update(dtype=qformer_dtype, param_dtype="float32")
  q = qformer.QFormerConfig.from_bert(
      bert, encoder_hidden_size=vision.hidden_size, cross_attention_frequency=cross_attention_frequency,
      layout="instructblip" if instruct else "blip2", **q_runtime)
  # Only the models that feed text to the Q-Former keep BERT's text FFN (LAVIS stage 2 drops it).
  takes_text = instruct or kind in ("Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection")
  q = dataclasses.replace(q, use_qformer_text_input=takes_text)
  text = text_config_from_dir(llm_dir, **runtime) if generative else None
  return blip2.Blip2Config(
      vision=vision, qformer=q, text=text, num_query_tokens=num_query_tokens,
      image_text_hidden_size=image_text_hidden_size, image_token_index=image_token_index,
      architecture=arch, instruct=instruct, initializer_range=q.initializer_range)


# ----------------------------------------------------------------------------------------
# loading


def _place(tree, shardings):
  """Puts every leaf of a host/device tree into its sharding (None: leave as is)."""
  if shardings is None:
    return tree
  flat, sh = io.flatten(tree), io.flatten(shardings)
  return io.unflatten({k: jax.device_put(v, sh[k]) for k, v in flat.items()})


def _cast(tree, abstract):
  ab = io.flatten(nn.unbox(abstract))
  return io.unflatten({k: np.asarray(v).astype(ab[k].dtype) for k, v in io.flatten(tree).items()})


def _load_vision(path, config, abstract, mesh, axis_rules):
  _, pre = _vision_source(path)
  reader = io.open_checkpoint(path)
  ignore = [r"(?!" + pre.replace(".", r"\.") + r").*"] if pre else []
  ignore += [pre.replace(".", r"\.") + p for p in vit.hf_ignore(config.vision)]
  rules = prefixed(vit.hf_rules(config.vision), "", pre)
  try:
    params = io.load_params(reader, rules, abstract, mesh=mesh, axis_rules=axis_rules,
                            ignore=ignore, name=path)
  except io.CheckpointError as e:
    v = config.vision
    raise io.CheckpointError(
        f"vision tower does not fit config.vision (hidden {v.hidden_size}, {v.num_hidden_layers} "
        f"layers, {v.num_attention_heads} heads, mlp {v.intermediate_size}, image {v.image_size}, "
        f"patch {v.patch_size}):\n{e}") from None
  n = sum(1 for k in reader.keys() if k.startswith(pre))
  return params, [f"vision_model.* ({n} tensors) <- {path}"], len(reader.keys()) - n


def _load_llm(path, config, abstract, mesh, axis_rules):
  fam = registry.family(config.text)
  reader = io.open_checkpoint(path)
  if config.family == "t5":
    has = io.has_lm_head(reader)
    if has == config.text.tie_word_embeddings:
      raise io.CheckpointError(
          f"{path}: the T5 checkpoint {'holds' if has else 'has no'} a separate lm_head.weight but "
          f"config.text.tie_word_embeddings is {config.text.tie_word_embeddings}; derive the config "
          "with config_from_towers / text_config_from_dir")
  rules, ignore = fam.hf_rules(config.text), fam.hf_ignore(config.text)
  if _read_json(path, "language_model").get("model_type") == GEMMA3_COMPOSITE:
    layout = gemma.composite_layout(reader.keys())
    rules = gemma.composite_hf_rules(config.text, layout)
    ignore = gemma.composite_hf_ignore(config.text, layout)
  try:
    params = io.load_params(reader, rules, abstract, mesh=mesh, axis_rules=axis_rules,
                            ignore=ignore, name=path)
  except io.CheckpointError as e:
    raise io.CheckpointError(f"language_model tower does not fit config.text:\n{e}") from None
  return params, [f"language_model.* ({len(reader.keys())} tensors) <- {path}"]


def _hf_names(config, top: str) -> list[str]:
  return [r.hf for r in expand(blip2.hf_rules(config)) if r.flax == top or r.flax.startswith(top + "/")]


def init_from_towers(config, *, vision: str | None = None, qformer_bert: str | None = None,
                     language_model: str | None = None, seed: int = 0, mesh=None, axis_rules=None,
                     new_token_init: str = "normal", fold_token_type: bool = False):
  """Builds `config`'s composite and fills it from the towers given (see the module docstring).

  Returns (model, params, report). params: the composite's (unboxed) tree, loadable by
  `save_pretrained`. report: "copied" and "initialised" (HF-style names, with sources),
  "unused" (source tensors left out), "qformer_lm_head" (param tree or None, see above) and
  "sources". With `mesh`, every leaf (and the LM head) is placed in its sharding under
  `axis_rules` (default: sharding.DEFAULT_RULES). `new_token_init` / `fold_token_type`: see
  `bert.from_bert_state_dict` (defaults as LAVIS).
  """

  if mesh is not None and axis_rules is None:
    axis_rules = shd.DEFAULT_RULES
  vision, qformer_bert, language_model = (None if p is None else hub.resolve(p)
                                          for p in (vision, qformer_bert, language_model))
  model = blip2.build(config)
  dummy = blip2.dummy_inputs(config)
  abstract = io.abstract_params(model, **dummy)
  shardings = None if mesh is None else shd.param_shardings(abstract, mesh, axis_rules)
  params: dict[str, Any] = {}
  report: dict[str, Any] = {"copied": [], "initialised": [], "unused": [], "qformer_lm_head": None,
                            "sources": {"vision": vision, "qformer_bert": qformer_bert,
                                        "language_model": language_model, "seed": seed}}

  if vision is not None:
    if "vision_model" not in abstract:
      raise ValueError(f"{config.architecture} has no vision model; drop vision=")
    params["vision_model"], copied, n_other = _load_vision(vision, config, abstract["vision_model"],
                                                           mesh, axis_rules)
    report["copied"] += copied
    if n_other:
      report["unused"].append(f"{vision}: {n_other} tensors outside vision_model.*")

  if qformer_bert is not None:
    qc = config.qformer
    init, rep = bert.from_bert_state_dict(qformer_bert, qc, seed=seed, new_token_init=new_token_init,
                                          fold_token_type=fold_token_type, lm_head=qc.has_text_ffn)
    params["qformer"] = _place(_cast(init["qformer"], abstract["qformer"]),
                               shardings and shardings["qformer"])
    report["copied"] += [f"{c} [{qformer_bert}]" for c in rep["copied"]
                         if not c.startswith(("embeddings.", "cls."))]
    report["initialised"] += [f"{c} [seed {seed}]" for c in rep["initialised"] if not c.startswith("cls.")]
    report["unused"] += [f"{qformer_bert}: {k}" for k in rep["unused"]]
    emb = [c for c in rep["copied"] if c.startswith("embeddings.")]
    if "embeddings" in init:
      if "embeddings" in abstract:
        params["embeddings"] = _place(_cast(init["embeddings"], abstract["embeddings"]),
                                      shardings and shardings["embeddings"])
        report["copied"] += [f"{c} [{qformer_bert}]" for c in emb]
      else:  # stage 2: LAVIS sets word/position embeddings to None
        report["unused"] += [f"{qformer_bert}: {c.split(' <- ')[1].split()[0]} (the composite has no text "
                             "embeddings)" for c in emb]
    if "lm_head" in init:
      head = qformer.QFormerLMHead(qc)
      ab = io.abstract_params(head, *qformer.init_args(qc)[0])
      report["qformer_lm_head"] = _place(_cast(init["lm_head"], ab), None if mesh is None else
                                         shd.param_shardings(ab, mesh, axis_rules))
      report["copied"] += [f"qformer_lm_head: {c} [{qformer_bert}]" for c in rep["copied"]
                           if c.startswith("cls.")]
      report["initialised"] += [f"qformer_lm_head: {c}" for c in rep["initialised"] if c.startswith("cls.")]

  if language_model is not None:
    if "language_model" not in abstract:
      raise ValueError(f"{config.architecture} has no language model; drop language_model=")
    params["language_model"], copied = _load_llm(language_model, config, abstract["language_model"],
                                                 mesh, axis_rules)
    report["copied"] += copied

  fresh = [k for k in abstract if k not in params]
  if fresh:
    def init(rng):  # jit + returning only `fresh` lets XLA drop the towers that get replaced
      p = nn.unbox(model.init(rng, **dummy)["params"])
      return {k: p[k] for k in fresh}
    out = None if shardings is None else {k: shardings[k] for k in fresh}
    params.update(jax.jit(init, out_shardings=out)(jax.random.PRNGKey(seed)))
    for k in fresh:
      names = _hf_names(config, k)
      if len(names) > 8:
        report["initialised"].append(f"{k}.* ({len(names)} tensors, no checkpoint given) [seed {seed}]")
      else:
        report["initialised"] += [f"{n} [seed {seed}]" for n in names]
  return model, {k: params[k] for k in abstract}, report
