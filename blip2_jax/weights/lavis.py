"""Original LAVIS checkpoints (`blip2_pretrained.pth`, `blip2_pretrained_opt2.7b.pth`, ...).

LAVIS names are renamed to the HF BLIP-2 layout here, then the HF name tables load them. A
LAVIS stage-2 file holds no LLM weights (LAVIS reads the LLM from the hub), so the LLM comes
from a separate HF directory; the architecture and sizes come from an HF BLIP-2 config.

Differences worth knowing: LAVIS's `ln_vision` uses eps 1e-5 where HF's post_layernorm uses the
vision eps (1e-6); we keep the config's value. `temp` and the Q-Former LM head
(`Qformer.cls.predictions.*`) have no HF slot; `lavis_extras` returns them for training.
"""
from __future__ import annotations

import re

import numpy as np

from blip2_jax.weights import io
from blip2_jax.weights.table import expand

# (LAVIS regex, HF replacement), applied in order; the first match wins.
RENAMES: list[tuple[str, str]] = [
    (r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
    (r"visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.(q_bias|v_bias)", r"vision_model.encoder.layers.\1.self_attn.\2"),
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
]
# LAVIS tensors with no HF slot: returned by `lavis_extras`, not loaded into the HF layout.
EXTRAS = (r"temp", r"Qformer\.cls\.predictions\..*")
# Buffers LAVIS saves that carry no weights.
DROP = (r".*position_ids", r".*relative_position_index")


def rename(lavis_state: dict) -> tuple[dict, list[str]]:
  """LAVIS state dict -> (HF-named dict, LAVIS keys that matched no rule)."""
  out, unknown = {}, []
  for k, v in lavis_state.items():
    if any(re.fullmatch(p, k) for p in DROP + EXTRAS):
      continue
    for pat, rep in RENAMES:
      if re.match(pat, k):
        out[re.sub(pat, rep, k, count=1)] = v
        break
    else:
      unknown.append(k)
  return out, unknown


def lavis_extras(lavis_state: dict) -> dict:
  """`temp` and the Q-Former LM head, with LAVIS names, as numpy arrays."""
  return {k: np.asarray(v) for k, v in lavis_state.items() if any(re.fullmatch(p, k) for p in EXTRAS)}


def load_lavis(pth_path: str, config, *, llm_dir: str | None = None, mesh=None, axis_rules=None):
  """Loads a LAVIS `.pth` into the composite described by `config` (a blip2 Blip2Config).

  Returns (model, params, extras). For conditional-generation configs `llm_dir` is the HF
  OPT / T5 / LLaMA directory of the frozen LLM.
  """
  from blip2_jax.models import blip2

  raw = io.TorchReader(pth_path)
  state = {k: raw.get(k) for k in raw.keys()}
  hf_named, unknown = rename(state)
  if unknown:
    raise io.CheckpointError(f"{pth_path}: {len(unknown)} tensors are not LAVIS BLIP-2 names: "
                             + ", ".join(unknown[:20]))
  model = blip2.build(config)
  rules = blip2.hf_rules(config)
  needed = {r.hf for r in expand(rules)}
  # LAVIS stage-2 Q-Formers still carry the unused text FFN and embeddings of stage 1.
  hf_named = {k: v for k, v in hf_named.items()
              if k in needed or not re.match(r"(qformer\.encoder\.layer\.\d+\.(intermediate|output)\.|embeddings\.)", k)}
  if config.text is not None:
    if llm_dir is None:
      raise ValueError("a LAVIS stage-2 checkpoint holds no LLM weights: pass llm_dir=<HF LLM directory>")
    llm = io.open_checkpoint(llm_dir)
    for k in llm.keys():
      hf_named["language_model." + k] = llm.get(k)
  abstract = io.abstract_params(model, **blip2.dummy_inputs(config))
  params = io.load_params(io.DictReader(hf_named, pth_path), rules, abstract, mesh=mesh,
                          axis_rules=axis_rules, ignore=blip2.hf_ignore(config))
  return model, params, lavis_extras(state)
