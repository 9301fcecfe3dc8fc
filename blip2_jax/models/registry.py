"""What the package can build: the LLM families and the HF architectures, with their capabilities.

Families (`FAMILIES`): opt, t5, llama, qwen2, qwen3, mistral, gemma2, gemma3, each its config
class, language-model module, name-table functions, cache init and whether it is encoder-decoder.
Architectures (`ARCHITECTURES`): every HF BLIP-2 / InstructBLIP class name, BLIP's captioner and
filter and CLIPModel, the composite of `blip2` (or `blip`, `clip`) that implements it and what it can
do. Ask for a capability instead of probing methods:

  registry.require(model, registry.ITM, "retrieval")  # TypeError naming the models that can
  if registry.can(model, registry.ITG): ...

Composites bind themselves to their architectures with `@registry.composite` (blip2.py, blip.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn

from blip2_jax.models import gemma, llama, opt, t5

# ----------------------------------------------------------------------------------------
# capabilities

LM = "lm"  # a language model: `get_image_features`, generation, captioning, VQA
ITC = "itc"  # image-text contrastive scores: `image_features`, `text_features`
ITM = "itm"  # image-text matching: `itm_logits`
ITG = "itg"  # the Q-Former's image-grounded text pass (stage-1 captioning): `itg_hidden`
INSTRUCT = "instruct"  # InstructBLIP: the instruction text also enters the Q-Former
CAPTION = "caption"  # BLIP's image-grounded text decoder: `decode` (decoding/blip.py)

# capability -> what it means, and the composite method that provides it (checked when a composite
# binds itself, so the table cannot drift from the classes)
CAPABILITIES = {
    LM: "a language model (generation, captioning, VQA)",
    ITC: "image-text contrastive scoring (ITC)",
    ITM: "image-text matching (ITM)",
    ITG: "the Q-Former's image-grounded text pass (stage-1 captioning)",
    INSTRUCT: "InstructBLIP's instruction input to the Q-Former",
    CAPTION: "BLIP's image-grounded text decoder (captioning)",
}
_METHODS = {LM: "get_image_features", ITC: "text_features", ITM: "itm_logits", ITG: "itg_hidden",
            INSTRUCT: "get_image_features", CAPTION: "decode"}


@dataclasses.dataclass(frozen=True)
class Family:
  """An LLM family. `init_cache(config, batch, max_length, ...)` (T5 also takes encoder_length)."""
  name: str
  config_cls: type
  lm_cls: type
  hf_rules: Callable[[Any], list]
  hf_ignore: Callable[[Any], list]
  init_cache: Callable[..., dict]
  encoder_decoder: bool
  model_types: tuple[str, ...]  # HF `model_type`s read as this family


FAMILIES = {
    "opt": Family("opt", opt.OPTConfig, opt.OPTForCausalLM, opt.hf_rules, opt.hf_ignore,
                  opt.init_cache, False, ("opt",)),
    "t5": Family("t5", t5.T5Config, t5.T5ForConditionalGeneration, t5.hf_rules, t5.hf_ignore,
                 t5.init_cache, True, ("t5", "mt5")),
    "llama": Family("llama", llama.LlamaConfig, llama.LlamaForCausalLM, llama.hf_rules,
                    llama.hf_ignore, llama.init_cache, False, ("llama",)),
}
# LLaMA's layer with switches (llama.py) and Gemma's (gemma.py); Gemma 3 also reads the text
# config of a Gemma 3 composite ("gemma3")
for _name, _cfg, _lm, _types in (
    ("qwen2", llama.Qwen2Config, llama.LlamaForCausalLM, ("qwen2",)),
    ("qwen3", llama.Qwen3Config, llama.LlamaForCausalLM, ("qwen3",)),
    ("mistral", llama.MistralConfig, llama.LlamaForCausalLM, ("mistral",)),
    ("gemma2", gemma.Gemma2Config, gemma.GemmaForCausalLM, ("gemma2",)),
    ("gemma3", gemma.Gemma3TextConfig, gemma.GemmaForCausalLM, ("gemma3_text", "gemma3"))):
  FAMILIES[_name] = Family(_name, _cfg, _lm, llama.hf_rules, llama.hf_ignore, llama.init_cache,
                           False, _types)


def family(name_or_config) -> Family:
  """The family of a name ("opt", ...) or of a text config instance."""
  if isinstance(name_or_config, str):
    if name_or_config not in FAMILIES:
      raise ValueError(f"unknown LLM family {name_or_config!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[name_or_config]
  for f in FAMILIES.values():
    if type(name_or_config) is f.config_cls:  # exact: Qwen2Config is also a LlamaConfig
      return f
  raise TypeError(f"unsupported text config {type(name_or_config).__name__}; supported: "
                  f"{', '.join(f.config_cls.__name__ for f in FAMILIES.values())}")


def family_of_model_type(model_type: str) -> Family:
  """The family reading an HF text config of `model_type` ("mt5" -> t5)."""
  for f in FAMILIES.values():
    if model_type in f.model_types:
      return f
  raise ValueError(f"text_config.model_type {model_type!r} is not supported "
                   f"(supported: {', '.join(t for f in FAMILIES.values() for t in f.model_types)})")


# ----------------------------------------------------------------------------------------
# architectures


@dataclasses.dataclass(frozen=True)
class Architecture:
  """An HF architecture name, the `blip2` composite class (by name) implementing it, and what
  that model can do."""
  name: str
  composite: str
  capabilities: frozenset[str]


def _arch(name, composite, *caps):
  return name, Architecture(name, composite, frozenset(caps))


ARCHITECTURES = dict([
    _arch("Blip2Model", "Blip2ForConditionalGeneration", LM),
    _arch("Blip2ForConditionalGeneration", "Blip2ForConditionalGeneration", LM),
    _arch("InstructBlipForConditionalGeneration", "Blip2ForConditionalGeneration", LM, INSTRUCT),
    _arch("Blip2ForImageTextRetrieval", "Blip2ForImageTextRetrieval", ITC, ITM, ITG),
    _arch("Blip2VisionModelWithProjection", "Blip2VisionModelWithProjection"),
    _arch("Blip2TextModelWithProjection", "Blip2TextModelWithProjection"),
    # BLIP (models/blip.py): the CapFilt captioner and filter
    _arch("BlipForConditionalGeneration", "BlipForConditionalGeneration", CAPTION),
    _arch("BlipForImageTextRetrieval", "BlipForImageTextRetrieval", ITC, ITM),
    _arch("CLIPModel", "CLIPModel", ITC),  # models/clip.py: CapFilt's ranker
])

_COMPOSITES: dict[str, type] = {}


def architecture(name: str) -> Architecture:
  if name not in ARCHITECTURES:
    raise ValueError(f"architecture {name!r} is not a BLIP-2 model; supported: {sorted(ARCHITECTURES)}")
  return ARCHITECTURES[name]


def composite(cls: type) -> type:
  """Class decorator of the `blip2` composites: binds `cls` to the architectures naming it, which
  must not claim a capability whose method `cls` lacks."""
  archs = [a for a in ARCHITECTURES.values() if a.composite == cls.__name__]
  if not archs:
    raise ValueError(f"no architecture is implemented by {cls.__name__}")
  for a in archs:
    missing = sorted(c for c in a.capabilities if not hasattr(cls, _METHODS[c]))
    if missing:
      raise TypeError(f"{a.name} claims {missing} but {cls.__name__} lacks their methods")
  _COMPOSITES[cls.__name__] = cls
  return cls


def composite_class(name: str) -> type:
  """The Flax composite implementing architecture `name`."""
  return _COMPOSITES[architecture(name).composite]


def _config_of(x):
  """The Blip2Config of a composite module, or `x` itself."""
  if isinstance(x, nn.Module):
    if not isinstance(x, tuple(_COMPOSITES.values())):
      raise TypeError(f"{type(x).__name__} is not a BLIP-2 composite; expected one of "
                      f"{sorted(_COMPOSITES)}")
    return x.config
  return x


def capabilities(x) -> frozenset[str]:
  """What an architecture (name), a Blip2Config or a BLIP-2 model can do (see CAPABILITIES). A
  config also answers for its own settings: no text config, no LM; `instruct`, INSTRUCT."""
  if isinstance(x, str):
    return architecture(x).capabilities
  cfg = _config_of(x)
  caps = set(architecture(cfg.architecture).capabilities)
  if cfg.text is None:
    caps.discard(LM)
  if getattr(cfg, "instruct", False):  # a BLIP-2 field; BLIP's and CLIP's configs lack it
    caps.add(INSTRUCT)
  return frozenset(caps)


def _check_capability(capability: str) -> None:
  if capability not in CAPABILITIES:
    raise ValueError(f"unknown capability {capability!r}; known: {sorted(CAPABILITIES)}")


def can(x, capability: str) -> bool:
  """Whether `x` (as `capabilities`) has `capability`."""
  _check_capability(capability)
  return capability in capabilities(x)


def architectures_with(capability: str) -> list[str]:
  _check_capability(capability)
  return [a.name for a in ARCHITECTURES.values() if capability in a.capabilities]


def require(x, capability: str, task: str | None = None) -> None:
  """Raises TypeError unless `x` has `capability`, naming the architectures that do."""
  if can(x, capability):
    return
  name = x if isinstance(x, str) else _config_of(x).architecture
  task = task or CAPABILITIES[capability]
  archs = architectures_with(capability)
  archs = ", ".join(archs[:-1]) + " or " + archs[-1] if len(archs) > 1 else archs[0]
  raise TypeError(f"{task} needs a checkpoint with {CAPABILITIES[capability]}: {archs}; {name} has none")
