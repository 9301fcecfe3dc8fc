"""Original LAVIS checkpoints (`blip2_pretrained.pth`, `blip2_pretrained_opt2.7b.pth`, ...).

LAVIS names are renamed to the HF BLIP-2 layout here, then the HF name tables load them. A
LAVIS stage-2 file holds no LLM weights (LAVIS reads the LLM from the hub), so the LLM comes
from a separate HF directory; the architecture and sizes come from an HF BLIP-2 config.

What `load_lavis` sets so that the model computes what LAVIS computes:
- `ln_vision` (HF's post_layernorm) is a default torch LayerNorm in LAVIS, eps 1e-5, where HF
  uses the vision eps (1e-6): the loaded config gets `vision.post_layernorm_eps = 1e-5`.
- LAVIS's runner saves only parameters with requires_grad, so a file written by a run with a
  frozen ViT holds no `visual_encoder.*` (LAVIS reads the EVA ViT from `eva_vit_g.pth` first and
  loads the checkpoint with strict=False over it). `vision=` gives that ViT: an `eva_vit_g.pth`-
  layout file (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.*`) or an HF BLIP-2 /
  Blip2VisionModel directory. `ln_vision` always comes from the checkpoint (it is trained).
- Retrieval / text composites get the Q-Former text path (use_qformer_text_input, and the
  vocabulary and position table sizes of the checkpoint's text embeddings, which LAVIS grows by
  `[DEC]`), so a config that gives only the sizes loads a stage-1 file.
`temp` and the Q-Former LM head (`Qformer.cls.predictions.*`) have no HF slot; `lavis_extras`
returns them for training.
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from blip2_jax.checkpoints import hf, io, towers
from blip2_jax.core.naming import expand
from blip2_jax.models import blip2, qformer, vit

# (LAVIS regex, HF replacement), applied in order; the first match wins.
RENAMES: list[tuple[str, str]] = [
    (r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
    (r"visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.", r"vision_model.encoder.layers.\1.mlp.\2."),
    (r"ln_vision\.", "vision_model.post_layernorm."),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.", r"embeddings.\1."),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.",
     r"qformer.encoder.layer.\1.\2.attention."),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.", r"qformer.encoder.layer.\1."),
    (r"(opt_proj|t5_proj|llm_proj)\.", "language_projection."),
    (r"vision_proj\.", "vision_projection."),
    (r"text_proj\.", "text_projection."),
    (r"(query_tokens|itm_head\..*)", r"\1"),
    # the frozen LLM, if a checkpoint carries it (LAVIS's own checkpoints drop frozen weights)
    (r"(opt_model|t5_model|llm_model)\.", "language_model."),
]
# Keys every LAVIS BLIP-2 checkpoint holds.
SIGNATURE = ("query_tokens",)
# EVA's separate q/v biases; `rename` fuses each layer's pair into HF's one `self_attn.qkv.bias`
# [q, 0, v] (vit.lavis_qkv_bias): the k part is zero in LAVIS and changes nothing in softmax.
QV_BIAS = r"visual_encoder\.blocks\.(\d+)\.attn\.(q_bias|v_bias)"
# LAVIS tensors with no HF slot: returned by `lavis_extras`, not loaded into the HF layout.
EXTRAS = (r"temp", r"Qformer\.cls\.predictions\..*")
# Buffers LAVIS saves that carry no weights.
DROP = (r".*position_ids", r".*relative_position_index")
# eps of LAVIS's `ln_vision` (Blip2Base.init_vision_encoder: LayerNorm(num_features), torch's default)
LN_VISION_EPS = 1e-5
# Tensors of an EVA ViT file that LAVIS's VisionTransformer has no slot for (its final norm and
# head are commented out; strict=False drops them): EVA's heads and the blocks past the model's
# depth (EVA-CLIP-g has 40, BLIP-2 builds 39).
EVA_UNUSED = (r"(norm|fc_norm|head)\..*", r"mask_token")


def rename(lavis_state: dict) -> tuple[dict, list[str]]:
  """LAVIS state dict -> (HF-named dict, LAVIS keys that matched no rule)."""
  out, unknown, qv = {}, [], {}
  for k, v in lavis_state.items():
    if any(re.fullmatch(p, k) for p in DROP + EXTRAS):
      continue
    m = re.fullmatch(QV_BIAS, k)
    if m:
      qv.setdefault(int(m.group(1)), {})[m.group(2)] = v
      continue
    for pat, rep in RENAMES:
      if re.match(pat, k):
        out[re.sub(pat, rep, k, count=1)] = v
        break
    else:
      unknown.append(k)
  for i, b in sorted(qv.items()):
    if len(b) != 2:  # a lone q_bias or v_bias: report it rather than guess the other
      unknown += [f"visual_encoder.blocks.{i}.attn.{n} (without its {'v' if n == 'q_bias' else 'q'}_bias)"
                  for n in b]
      continue
    out[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = vit.lavis_qkv_bias(
        _np(b["q_bias"]), _np(b["v_bias"]))
  return out, unknown


def _np(v):
  return v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v)


def lavis_extras(lavis_state: dict) -> dict:
  """`temp` and the Q-Former LM head, with LAVIS names, as numpy arrays."""
  return {k: np.asarray(v) for k, v in lavis_state.items() if any(re.fullmatch(p, k) for p in EXTRAS)}


def load_lavis(pth_path: str, config, *, llm_dir: str | None = None, vision: str | None = None,
               mesh=None, axis_rules=None):
  """Loads a LAVIS `.pth` into the composite described by `config` (a blip2 Blip2Config).

  Returns (model, params, extras); `model.config` is `config` with LAVIS's settings (module
  docstring): ln_vision eps 1e-5 and, for retrieval / text composites, the Q-Former text path.
  For conditional-generation configs `llm_dir` is the HF OPT / T5 / LLaMA directory of the frozen
  LLM. `vision`: where the ViT comes from when the checkpoint holds none (LAVIS's runner drops
  the frozen ViT): an `eva_vit_g.pth`-layout file (blocks past the config's depth and EVA's heads
  left out, as LAVIS's strict=False does) or an HF BLIP-2 / vision directory (its
  `vision_model.*`, without post_layernorm); its position embeddings are resized bicubically to
  the config's image size, as LAVIS's interpolate_pos_embed. Every other tensor is loaded
  strictly: anything missing or unexpected is named in one CheckpointError.
  """

  raw = io.TorchReader(pth_path)
  state = {k: raw.get(k) for k in raw.keys()}
  if not all(k in state for k in SIGNATURE) or not any(k.startswith("Qformer.bert.") for k in state):
    raise io.CheckpointError(
        f"{pth_path} is not a LAVIS BLIP-2 checkpoint (no query_tokens / Qformer.bert.* among its "
        f"{len(state)} tensors; first keys: {sorted(state)[:8]})")
  hf_named, unknown = rename(state)
  if unknown:
    raise io.CheckpointError(f"{pth_path}: {len(unknown)} tensors are not LAVIS BLIP-2 names: "
                             + ", ".join(unknown[:20]))
  config = _lavis_config(config, hf_named)
  hf_named.update(_vision_weights(pth_path, hf_named, vision, config))
  # LAVIS stage-2 Q-Formers may still carry the unused text FFN and embeddings of stage 1.
  needed = {r.hf for r in expand(blip2.hf_rules(config))}
  hf_named = {k: v for k, v in hf_named.items()
              if k in needed or not re.match(r"(qformer\.encoder\.layer\.\d+\.(intermediate|output)\.|embeddings\.)", k)}
  if config.text is not None:
    has_llm = any(k.startswith("language_model.") for k in hf_named)
    if llm_dir is None and not has_llm:
      raise ValueError("a LAVIS stage-2 checkpoint holds no LLM weights: pass llm_dir=<HF LLM directory>")
    if llm_dir is not None:
      if has_llm:
        raise ValueError(f"{pth_path} already holds the LLM (opt_model/t5_model/llm_model.*); drop llm_dir")
      llm = io.open_checkpoint(llm_dir)
      for k in llm.keys():
        hf_named["language_model." + k] = llm.get(k)
  reader = io.DictReader(hf_named, pth_path)
  config = hf.fit_to_checkpoint(config, reader)  # T5: tied head iff no separate lm_head
  model = blip2.build(config)
  rules = blip2.hf_rules(config)
  abstract = io.abstract_params(model, **blip2.dummy_inputs(config))
  params = io.load_params(reader, rules, abstract, mesh=mesh,
                          axis_rules=axis_rules, ignore=blip2.hf_ignore(config))
  return model, params, lavis_extras(state)


def _lavis_config(config, hf_named: dict):
  """`config` with what LAVIS computes: ln_vision's eps and, for the composites that read text in
  the Q-Former, the text path sized by the checkpoint's (renamed) text embeddings."""
  config = dataclasses.replace(
      config, vision=dataclasses.replace(config.vision, post_layernorm_eps=LN_VISION_EPS))
  if config.kind not in ("Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection"):
    return config
  sizes = {}
  for key, field in (("embeddings.word_embeddings.weight", "vocab_size"),
                     ("embeddings.position_embeddings.weight", "max_position_embeddings")):
    if key in hf_named:  # absent: the strict load names it
      sizes[field] = int(hf_named[key].shape[0])
  qformer = dataclasses.replace(config.qformer, use_qformer_text_input=True, **sizes)
  return dataclasses.replace(config, qformer=qformer)


def _vision_weights(pth_path: str, hf_named: dict, vision: str | None, config) -> dict:
  """HF-named ViT tensors from `vision`, checked against what the checkpoint holds."""
  has_vit = any(k.startswith("vision_model.") and not k.startswith("vision_model.post_layernorm.")
                for k in hf_named)
  if config.kind == "Blip2TextModelWithProjection":
    if vision is not None:
      raise ValueError(f"{config.architecture} has no vision model; drop vision=")
    return {}
  if vision is None:
    if not has_vit:
      raise ValueError(
          f"{pth_path} holds no ViT (visual_encoder.*): LAVIS saves only trained parameters and "
          "reads the frozen EVA ViT from eva_vit_g.pth; pass vision=<eva_vit_g.pth or an HF BLIP-2 "
          "directory>")
    return {}
  if has_vit:
    raise ValueError(f"{pth_path} already holds the ViT (visual_encoder.*); drop vision=")
  out = _hf_vision(vision) if os.path.isdir(vision) else _eva_vision(vision, config.vision.num_hidden_layers)
  return _fit_positions(out, config.vision)


def _eva_vision(path: str, depth: int) -> dict:
  """An `eva_vit_g.pth`-layout file (lavis/models/eva_vit.py: no `visual_encoder.` prefix)."""
  raw = io.TorchReader(path)
  if "cls_token" not in raw or "pos_embed" not in raw:
    raise io.CheckpointError(f"{path} is not an EVA ViT file like eva_vit_g.pth (no cls_token / "
                             f"pos_embed; first keys: {sorted(raw.keys())[:8]})")
  state = {}
  for k in raw.keys():
    block = re.match(r"blocks\.(\d+)\.", k)
    if (block and int(block.group(1)) >= depth) or any(re.fullmatch(p, k) for p in EVA_UNUSED):
      continue
    state["visual_encoder." + k] = raw.get(k)
  out, unknown = rename(state)  # every rename of a visual_encoder.* name is a vision_model.* one
  if unknown:
    raise io.CheckpointError(f"{path}: {len(unknown)} tensors are not EVA ViT names: "
                             + ", ".join(u.removeprefix("visual_encoder.") for u in unknown[:20]))
  return out


def _hf_vision(path: str) -> dict:
  """`vision_model.*` of an HF BLIP-2 / InstructBLIP / Blip2VisionModel directory, without
  post_layernorm (LAVIS's ln_vision is trained: the checkpoint holds it)."""
  _, prefix = towers._vision_source(path)
  reader = io.open_checkpoint(path)
  return {"vision_model." + k[len(prefix):]: reader.get(k) for k in reader.keys()
          if k.startswith(prefix) and not k.startswith(prefix + "post_layernorm.")}


def _fit_positions(tensors: dict, vcfg) -> dict:
  """Resizes the patch position embeddings to the config's grid (LAVIS's interpolate_pos_embed:
  torch bicubic, align_corners=False; the CLS position unchanged)."""
  import jax.numpy as jnp
  key = "vision_model.embeddings.position_embedding"
  if key not in tensors:
    return tensors
  pos = np.asarray(tensors[key], np.float32)
  n = pos.shape[1] - 1 if pos.ndim == 3 else -1
  src = int(round(max(n, 0) ** 0.5))
  if src * src != n or src == vcfg.grid:
    return tensors  # the strict load reports a shape it cannot use
  grid = jnp.asarray(pos[0, 1:].reshape(src, src, -1))
  patches = np.asarray(vit.resize_bicubic(grid, (vcfg.grid, vcfg.grid))).reshape(1, vcfg.grid ** 2, -1)
  return {**tensors, key: np.concatenate([pos[:, :1], patches], axis=1)}


def qformer_head_params(extras: dict, model):
  """(lm_head_params, temp) from `lavis_extras`: the Q-Former LM head for `qformer.QFormerLMHead`
  (tied to the word embeddings, as LAVIS; the saved `decoder.weight` is that same table) and the
  ITC temperature. Save them beside an HF directory with `checkpoints.hf.save_qformer_head`."""
  import jax.numpy as jnp
  cfg = model.config.qformer
  prefix = "Qformer.cls.predictions."
  if not any(k.startswith(prefix) for k in extras):
    raise io.CheckpointError("this LAVIS checkpoint holds no Q-Former LM head (Qformer.cls.predictions.*): "
                             "stage-2 checkpoints drop it; use a stage-1 one (blip2_pretrained.pth)")
  head = qformer.QFormerLMHead(cfg, True)
  abstract = io.abstract_params(head, *qformer.init_args(cfg)[0])
  params = io.load_params(io.DictReader(extras, "LAVIS extras"), qformer.lm_head_hf_rules(cfg, True, prefix),
                          abstract, ignore=[r"temp", re.escape(prefix) + r"decoder\.(weight|bias)"])
  temp = jnp.asarray(extras["temp"], jnp.float32).reshape(()) if "temp" in extras else None
  return params, temp
