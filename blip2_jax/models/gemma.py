"""Gemma 2 and Gemma 3 (text) decoder-only language models (HF `Gemma2ForCausalLM`,
`Gemma3ForCausalLM`), Flax linen: LLaMA's attention and MLP (`llama`) with Gemma's differences.

What differs from LLaMA (transformers 5.23, `models/gemma2`, `models/gemma3`):
- RMSNorm with (1 + weight) in float32 (weights stored around 0), and four per layer: input and
  post-attention norms around the attention, pre- and post-feedforward norms around the MLP; the
  post norms apply to the branch before the residual sum.
- Token embeddings times sqrt(hidden_size), the scale rounded to the weight dtype (HF's
  `*TextScaledWordEmbedding`); only the lookup is scaled, not the tied head, and not BLIP-2's
  projected queries (HF inserts them into the scaled text embeddings).
- Attention logits scaled by `query_pre_attn_scalar ** -0.5`, not head_dim's.
- Gemma 2: attention logits soft-capped (`attn_logit_softcapping`: cap * tanh(x / cap) before the
  mask) and final logits too (`final_logit_softcapping`). Gemma 3 keeps the final cap (None in its
  releases) but HF 5.23's Gemma 3 attention never applies `attn_logit_softcapping`, so neither do we.
- Alternating local (sliding-window) and global layers (`layer_types`; Gemma 2 defaults to every
  other layer, Gemma 3 to `sliding_window_pattern` 6: five local, one global).
- Gemma 3: RMSNorm (Gemma's) over each query / key head before RoPE, and two RoPE bases: local
  layers `rope_local_base_freq` (HF: rope_parameters["sliding_attention"], default type only),
  global layers `rope_theta` with its scaling (rope_parameters["full_attention"]).
- gelu_pytorch_tanh in the gated MLP (`hidden_activation`).

Parameter tree (unrolled), mirroring HF names:
  model/embed_tokens/embedding
  model/layers_{i}/self_attn/{q,k,v,o}_proj[, q_norm, k_norm (Gemma 3)]
  model/layers_{i}/mlp/{gate,up,down}_proj
  model/layers_{i}/{input,post_attention,pre_feedforward,post_feedforward}_layernorm/scale
  model/norm/scale
  lm_head/kernel                                (untied models only)
A Gemma 3 *composite* directory (model_type "gemma3", Gemma3ForConditionalGeneration) gives its
text config and, under `language_model.model.` (as saved), its LLM weights (`composite_hf_rules`);
the LLM runs as Gemma3ForCausalLM (what HF's BLIP-2 builds from that text config), which applies
`final_logit_softcapping` where Gemma3ForConditionalGeneration's own head does not (None in the
released models, so they agree).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from blip2_jax.core.naming import Rule
from blip2_jax.models import causal_lm, llama
from blip2_jax.models import layers as L

ACT_AXES = llama.ACT_AXES


@dataclasses.dataclass(frozen=True)
class Gemma2Config(llama.LlamaConfig):
  vocab_size: int = 256000
  hidden_size: int = 2304
  intermediate_size: int = 9216
  num_hidden_layers: int = 26
  num_attention_heads: int = 8
  num_key_value_heads: int | None = 4
  head_dim: int | None = 256
  hidden_act: str = "gelu_pytorch_tanh"  # HF `hidden_activation`
  max_position_embeddings: int = 8192
  tie_word_embeddings: bool = True
  pad_token_id: int | None = 0
  bos_token_id: int | None = 2
  eos_token_id: Any = 1
  query_pre_attn_scalar: float = 256
  sliding_window: int | None = 4096
  layer_types: tuple[str, ...] | None = None  # None: HF's default pattern
  final_logit_softcapping: float | None = 30.0
  attn_logit_softcapping: float | None = 50.0

  model_type: ClassVar[str] = "gemma2"
  hf_class: ClassVar[str] = "Gemma2Config"
  hf_names: ClassVar[dict] = {"hidden_act": "hidden_activation"}
  pattern: ClassVar[int] = 2  # default layer_types: every `pattern`-th layer global

  def __post_init__(self):
    super().__post_init__()
    if self.layer_types is None:
      object.__setattr__(self, "layer_types", tuple(
          "sliding_attention" if (i + 1) % self.pattern else "full_attention"
          for i in range(self.num_hidden_layers)))
    llama.check_layer_types(self)

  @property
  def gate_bias(self) -> bool:
    return False

  @property
  def norm_offset(self) -> float:
    return 1.0

  @property
  def attn_scale(self) -> float:
    return self.query_pre_attn_scalar ** -0.5

  @property
  def attn_softcap(self) -> float | None:
    return self.attn_logit_softcapping

  @property
  def windows(self):
    return llama.layer_windows(self.layer_types, self.sliding_window)

  @property
  def layer_norms(self) -> tuple[str, ...]:
    return ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm")

  @property
  def embed_scale(self) -> float:
    return self.hidden_size ** 0.5


@dataclasses.dataclass(frozen=True)
class Gemma3TextConfig(Gemma2Config):
  vocab_size: int = 262208
  max_position_embeddings: int = 131072
  final_logit_softcapping: float | None = None
  attn_logit_softcapping: float | None = None  # kept for to_hf; HF 5.23 does not apply it
  rope_theta: float = 1_000_000.0  # global layers
  rope_local_theta: float = 10_000.0  # local layers (HF `rope_local_base_freq`)

  model_type: ClassVar[str] = "gemma3_text"
  hf_class: ClassVar[str] = "Gemma3TextConfig"
  pattern: ClassVar[int] = 6  # HF's `sliding_window_pattern` default

  @property
  def qk_norm(self) -> bool:
    return True

  @property
  def attn_softcap(self) -> float | None:
    return None

  @classmethod
  def _hf(cls, hf_config):
    # the text config inside a Gemma 3 composite (Gemma3ForConditionalGeneration)
    if isinstance(hf_config, dict) and hf_config.get("model_type") == "gemma3":
      hf_config = hf_config["text_config"]
    elif getattr(hf_config, "model_type", None) == "gemma3":
      hf_config = hf_config.text_config
    return super()._hf(hf_config)

  @classmethod
  def _rope_kw(cls, hf_config) -> dict:
    rp = dict(hf_config.rope_parameters)
    local = rp.get("sliding_attention") or {"rope_type": "default", "rope_theta": 10_000.0}
    if local.get("rope_type", "default") != "default":
      raise ValueError(f"rope_parameters.sliding_attention.rope_type {local['rope_type']!r} is not "
                       "supported (the local layers' RoPE is the default type)")
    kw = cls._rope_from_hf(rp.get("full_attention") or {"rope_type": "default", "rope_theta": 1e6},
                           "rope_parameters.full_attention")
    return dict(kw, rope_local_theta=float(local["rope_theta"]))

  def _rope_to_hf(self) -> dict:
    return {"full_attention": super()._rope_to_hf(),
            "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_theta}}


# ----------------------------------------------------------------------------------------
# modules


def _norm(cfg, name):
  return L.norm(cfg, name, eps=cfg.rms_norm_eps, rms=True, scale_offset=1.0)


class GemmaDecoderLayer(nn.Module):
  """Gemma's sandwich: x + post_attn_norm(attn(input_norm(x))), then x + post_ff_norm(mlp(pre_ff_norm(x)))."""
  config: Gemma2Config

  @nn.compact
  def __call__(self, x, bias, cos, sin, cache_index=None, cache=None, *, kind=None):
    """-> x, or (x, new cache) when a per-layer `cache` is given; `kind` as LlamaDecoderLayer."""
    cfg = self.config
    bias, cos, sin = causal_lm.for_kind(kind, bias, cos, sin)
    h = llama.LlamaAttention(cfg, name="self_attn")(_norm(cfg, "input_layernorm")(x), bias, cos, sin,
                                                    cache_index, cache)
    if cache is not None:
      h, cache = h
    x = L.constrain(x + _norm(cfg, "post_attention_layernorm")(h), ACT_AXES)
    h = llama.LlamaMLP(cfg, name="mlp")(_norm(cfg, "pre_feedforward_layernorm")(x))
    x = L.constrain(x + _norm(cfg, "post_feedforward_layernorm")(h), ACT_AXES)
    return x if cache is None else (x, cache)


class GemmaModel(llama.LlamaModel):
  """HF Gemma2Model / Gemma3TextModel."""
  config: Gemma2Config
  layer_cls = GemmaDecoderLayer

  def make_embed(self):
    cfg = self.config
    return L.embed(cfg, cfg.vocab_size, cfg.hidden_size, "embed_tokens", scale=cfg.embed_scale)

  def rope(self, position_ids, t: int):
    cfg = self.config
    if not isinstance(cfg, Gemma3TextConfig):
      return super().rope(position_ids, t)
    # Gemma 3: local layers rotate with their own base; one (cos, sin) per attention variant
    pos = jnp.broadcast_to(position_ids, (position_ids.shape[0], t))
    local = dataclasses.replace(cfg, rope_type="default", rope_theta=cfg.rope_local_theta,
                                rope_factor=None)
    _, variants = causal_lm.layer_kinds(cfg.windows)
    pairs = [llama.rope_cos_sin(cfg if w is None else local, pos, cfg.jdtype) for w in variants]
    if len(pairs) == 1:
      return pairs[0]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


class GemmaForCausalLM(causal_lm.CausalLM):
  """HF Gemma2ForCausalLM / Gemma3ForCausalLM (final logits soft-capped by the scaffold)."""
  config: Gemma2Config
  model_cls = GemmaModel


# ----------------------------------------------------------------------------------------
# HF name table


hf_rules = llama.hf_rules  # the config's layer_norms / qk_norm name Gemma's extra norms
hf_ignore = llama.hf_ignore


# A Gemma 3 composite's LLM keys: transformers 5 holds `model.language_model.*` + `lm_head` in
# memory and saves (as the Hub checkpoints are) `language_model.model.*` + `language_model.lm_head`.
COMPOSITE_LAYOUTS = {"saved": ("language_model.model.", "language_model.lm_head."),
                     "module": ("model.language_model.", "lm_head.")}


def composite_layout(keys) -> str:
  """The layout (COMPOSITE_LAYOUTS) of a Gemma 3 composite checkpoint's tensor names."""
  return "saved" if any(k.startswith("language_model.model.") for k in keys) else "module"


def composite_hf_rules(config: Gemma3TextConfig, layout: str = "saved") -> list[Rule]:
  """The LLM's names inside a Gemma 3 composite checkpoint (Gemma3ForConditionalGeneration)."""
  model, head = COMPOSITE_LAYOUTS[layout]
  return [dataclasses.replace(r, hf=(model + r.hf[len("model."):]) if r.hf.startswith("model.")
                              else head + r.hf[len("lm_head."):]) for r in hf_rules(config)]


def composite_hf_ignore(config: Gemma3TextConfig, layout: str = "saved") -> list[str]:
  """A Gemma 3 composite's keys the LLM does not use (vision tower, projector) or may hold (tied head)."""
  head = COMPOSITE_LAYOUTS[layout][1].replace(".", r"\.")
  return [r"(model\.)?vision_tower\..*", r"(model\.)?multi_modal_projector\..*", head + "weight"]
