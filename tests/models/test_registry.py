"""The registry (families, architectures, capabilities), the runtime base of the model configs, the
layer factories and the shared cross-entropy. No model is run here; about 5 s."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blip2_jax.checkpoints import tiny
from blip2_jax.models import blip2, llama, opt, qformer, registry, t5, vit
from blip2_jax.models import layers as L

CONFIGS = [vit.VisionConfig, qformer.QFormerConfig, opt.OPTConfig, llama.LlamaConfig, t5.T5Config]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_runtime_fields_are_shared(cls):
  assert issubclass(cls, L.Runtime)
  c = cls(scan=True, remat="full")
  assert c.runtime == dict(dtype="float32", param_dtype="float32", scan=True, remat="full", attn_impl=None)
  assert c == cls(scan=True, remat="full") and hash(c) == hash(cls(scan=True, remat="full"))
  assert c != cls() and c.replace_runtime(scan=False, remat="none") == cls()
  assert c.jdtype == jnp.float32 and c.replace_runtime(dtype="bfloat16").jdtype == jnp.bfloat16
  with pytest.raises(TypeError, match="hidden_size"):
    c.replace_runtime(hidden_size=8)
  with pytest.raises(ValueError, match="unknown remat policy 'bogus'"):
    cls(remat="bogus")


def test_from_hf_takes_runtime_and_round_trips():
  hf = tiny.tiny_text_config("opt")
  c = opt.OPTConfig.from_hf(hf, dtype="bfloat16", scan=True)
  assert (c.dtype, c.scan, c.hidden_size) == ("bfloat16", True, 40)
  assert opt.OPTConfig.from_hf(c.to_hf(), **c.runtime) == c
  assert set(L.RUNTIME_FIELDS) == set(c.runtime)


def test_factories_read_the_config():
  cfg = opt.OPTConfig(hidden_size=8, num_attention_heads=2, init_std=0.5, dtype="bfloat16")
  d = L.dense(cfg, 4, ("embed", "mlp"), "fc", use_bias=False)
  assert (d.features, d.axes, d.use_bias, d.dtype, d.param_dtype, d.init_std, d.name) == (
      4, ("embed", "mlp"), False, jnp.bfloat16, jnp.float32, 0.5, "fc")
  assert L.dense(cfg, 4, ("embed", "mlp"), init_std=0.1).init_std == 0.1
  assert L.embed(cfg, 10, 8).init_std == 0.5
  assert L.dense(t5.T5Config(d_model=16), 4, ("embed", "mlp")).init_std == 0.25
  n = L.norm(cfg, "ln", eps=1e-5, affine=False)
  assert (n.use_scale, n.use_bias, n.rms, n.eps) == (False, False, False, 1e-5)
  r = L.norm(cfg, "rms", eps=1e-6, rms=True)
  assert (r.use_scale, r.use_bias, r.rms) == (True, False, True)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(smoothing):
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 5, 7)).astype(np.float32) * 3
  labels = rng.integers(0, 7, (2, 5))
  labels[0, :2] = -100
  ref = F.cross_entropy(torch.tensor(logits).reshape(-1, 7), torch.tensor(labels).reshape(-1),
                        label_smoothing=smoothing)
  got = L.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=smoothing)
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)  # measured 0 / 1 ulp
  s = L.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=smoothing, reduction="sum")
  np.testing.assert_allclose(float(s), float(ref) * 8, rtol=1e-6)
  assert float(L.cross_entropy(jnp.zeros((2, 3)), jnp.array([-100, -100]))) == 0.0


def test_families():
  assert set(registry.FAMILIES) == {"opt", "t5", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3"}
  for name, f in registry.FAMILIES.items():
    cfg = f.config_cls()
    assert registry.family(name) is f and registry.family(cfg) is f
    assert isinstance(f.hf_rules(cfg), list) and isinstance(f.hf_ignore(cfg), list)
    assert f.encoder_decoder == (name == "t5")
  assert registry.family_of_model_type("mt5").name == "t5"
  assert registry.family_of_model_type("gemma3_text").name == "gemma3"
  with pytest.raises(ValueError, match="'gpt2' is not supported"):
    registry.family_of_model_type("gpt2")
  with pytest.raises(ValueError, match="unknown LLM family"):
    registry.family("gpt2")
  with pytest.raises(TypeError, match="unsupported text config VisionConfig"):
    registry.family(vit.VisionConfig())
  cache = registry.family("llama").init_cache(llama.LlamaConfig(num_hidden_layers=2, hidden_size=32,
                                                                 num_attention_heads=4,
                                                                 num_key_value_heads=2), 3, 7)
  assert cache["k"].shape == (2, 3, 2, 7, 8) and cache["v"].dtype == jnp.float32


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_architectures(arch):
  """Every HF architecture builds its composite, and its capabilities are what the model does."""
  fam = None if arch in ("Blip2ForImageTextRetrieval", "Blip2VisionModelWithProjection",
                         "Blip2TextModelWithProjection") else "opt"
  hf = tiny.tiny_blip2_config(fam, instruct=arch.startswith("Instruct"))
  hf.architectures = [arch]
  cfg = blip2.Blip2Config.from_hf(hf)
  model = blip2.build(cfg)
  assert type(model) is registry.composite_class(arch) and type(model).__name__ == cfg.kind
  caps = registry.capabilities(model)
  assert caps == registry.capabilities(cfg)
  assert (registry.LM in caps) == (fam is not None)
  assert (registry.INSTRUCT in caps) == arch.startswith("Instruct") == cfg.instruct
  assert {registry.ITC, registry.ITM, registry.ITG} & caps == (
      {registry.ITC, registry.ITM, registry.ITG} if arch == "Blip2ForImageTextRetrieval" else set())
  assert registry.can(model, registry.ITM) == (arch == "Blip2ForImageTextRetrieval")


def test_require_names_what_can():
  hf = tiny.tiny_blip2_config("opt")
  model = blip2.build(blip2.Blip2Config.from_hf(hf))
  registry.require(model, registry.LM, "captioning")
  with pytest.raises(TypeError, match="retrieval needs a checkpoint with image-text matching \\(ITM\\): "
                     "Blip2ForImageTextRetrieval or BlipForImageTextRetrieval; Blip2ForConditionalGeneration has none"):
    registry.require(model, registry.ITM, "retrieval")
  with pytest.raises(ValueError, match="unknown capability 'fly'"):
    registry.can(model, "fly")
  with pytest.raises(ValueError, match="'GPT2' is not a BLIP-2 model"):
    registry.capabilities("GPT2")
  with pytest.raises(TypeError, match="VisionModel is not a BLIP-2 composite"):
    registry.can(vit.VisionModel(vit.VisionConfig()), registry.LM)
  # a config without a language model has no LM, whatever its architecture says
  no_text = dataclasses.replace(model.config, text=None)
  assert not registry.can(no_text, registry.LM)


def test_composites_must_provide_their_capabilities():
  class Blip2ForImageTextRetrieval:  # claims ITC / ITM / ITG without their methods
    pass
  with pytest.raises(TypeError, match="lacks their methods"):
    registry.composite(Blip2ForImageTextRetrieval)
  assert registry.composite_class("Blip2ForImageTextRetrieval") is blip2.Blip2ForImageTextRetrieval
