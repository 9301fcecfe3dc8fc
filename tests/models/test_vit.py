"""Parity of blip2_jax.models.vit against HF Blip2VisionModel (eager, float32, CPU).

Measured max abs diffs (outputs of order 1; CPU, jax 0.10.2, torch 2.13) are in the comments;
the bounds are the project's float32 goal (tests/bounds.py: 1e-5 x the largest |reference|).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from blip2_jax.checkpoints import io
from blip2_jax.models import layers as L
from blip2_jax.models import vit
from blip2_jax.models.vit import VisionConfig, VisionModel, hf_rules

from bounds import BF16_REL, assert_close

TINY = dict(hidden_size=44, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=28, patch_size=14)  # head dim 11: odd, like ViT-g's 88 is not a power of 2


# ----------------------------------------------------------------------------------------
# helpers


def make_hf(seed: int = 0, **overrides):
  """A tiny random HF Blip2VisionModel with every norm / bias pushed away from 1 / 0."""
  from transformers import Blip2VisionConfig, Blip2VisionModel
  hc = Blip2VisionConfig(**{**TINY, **overrides})
  torch.manual_seed(seed)
  model = Blip2VisionModel._from_config(hc, attn_implementation="eager").eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.3 * torch.randn_like(p))
      elif p.ndim >= 2 and "embedding" not in name.split(".")[-1]:  # Linear / conv weights
        fan_in = p[0].numel()
        p.copy_(torch.randn_like(p) / fan_in ** 0.5)
      else:  # biases (qkv bias k part included), class / position embeddings
        p.copy_(0.5 * torch.randn_like(p))
  return model


def apply(cfg, params, x, interpolate=False, dropout_rng=None):
  """Jitted forward (one compile per config and shape: faster than op-by-op on CPU)."""
  return _apply(cfg, params, x, interpolate, dropout_rng)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(cfg, params, x, interpolate, dropout_rng):
  rngs = None if dropout_rng is None else {"dropout": dropout_rng}
  return VisionModel(cfg).apply({"params": params}, x, interpolate,
                                deterministic=dropout_rng is None, rngs=rngs)


def nhwc(x: torch.Tensor) -> jax.Array:
  return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def load(model, tmp_path, **runtime):
  """save_pretrained -> strict load into our (possibly scanned) tree; returns (cfg, params)."""
  model.save_pretrained(tmp_path)
  cfg = VisionConfig.from_hf(model.config, **runtime)
  s = cfg.image_size
  abstract = io.abstract_params(VisionModel(cfg), jnp.zeros((1, s, s, 3)))
  return cfg, io.load_params(str(tmp_path), hf_rules(cfg), abstract, ignore=vit.hf_ignore(cfg))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """The TINY model saved once and loaded, shared by the tests that do not vary the config."""
  model = make_hf()
  cfg, params = load(model, tmp_path_factory.mktemp("base"))
  return model, cfg, params


def run_both(model, cfg, params, x, interpolate=False):
  with torch.no_grad():
    ref = model(pixel_values=x, interpolate_pos_encoding=interpolate)
  out = apply(cfg, params, nhwc(x), interpolate)
  return ref, out


def assert_parity(ref, out):
  assert_close(out["last_hidden_state"], ref.last_hidden_state, "last_hidden_state")
  assert_close(out["pooler_output"], ref.pooler_output, "pooler_output")


# ----------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("overrides,hw", [
    ({}, (28, 28)),
    ({"qkv_bias": False}, (28, 28)),
    ({"hidden_act": "gelu_new"}, (28, 28)),
    ({"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}, (28, 28)),
    ({"hidden_act": "relu"}, (28, 28)),
    ({"hidden_act": "silu"}, (28, 28)),
    # 16 patches, 3 layers, 8 heads of 4; a 35 px input has pixels that fill no whole patch
    ({"image_size": 32, "patch_size": 8, "num_hidden_layers": 3, "hidden_size": 32,
      "num_attention_heads": 8}, (35, 35)),
])
def test_parity(tmp_path, overrides, hw):
  model = make_hf(**overrides)
  cfg, params = load(model, tmp_path)
  torch.manual_seed(1)
  x = torch.randn(3, 3, *hw)
  ref, out = run_both(model, cfg, params, x)
  assert out["last_hidden_state"].shape == tuple(ref.last_hidden_state.shape)
  # measured (last / pooler, values up to ~4): base 9.5e-7 / 1.2e-6, no qkv bias 1.1e-6 / 1.1e-6,
  # gelu_new 9.5e-7 / 1.1e-6, quick_gelu 9.5e-7 / 1.3e-6, relu 9.5e-7 / 1.2e-6, silu 1.2e-6 / 1.2e-6,
  # patch 8 at 35 px 9.5e-7 / 1.2e-6 (transformers 5.23); transformers 5.24 up to 2.7e-6
  assert_parity(ref, out)


@pytest.mark.parametrize("hw", [(42, 42), (70, 70), (42, 70)])
def test_interpolate_pos_encoding(base, hw):
  """28 px / patch 14 trained; run at 42 and 70 px (like 224 -> 364 / 490) and non-square."""
  model, cfg, params = base
  torch.manual_seed(2)
  x = torch.randn(2, 3, *hw)
  ref, out = run_both(model, cfg, params, x, interpolate=True)
  assert out["last_hidden_state"].shape == (2, 1 + (hw[0] // 14) * (hw[1] // 14), 44)
  # measured (last / pooler): 42 px 9.7e-7 / 1.2e-6; 70 px 1.2e-6 / 1.5e-6; 42x70 9.5e-7 / 9.5e-7
  # (transformers 5.24: up to 2.6e-6)
  assert_parity(ref, out)


def test_interpolate_at_native_size_is_identity(base):
  model, cfg, params = base
  x = nhwc(torch.randn(1, 3, 28, 28))
  a = apply(cfg, params, x, False)
  b = apply(cfg, params, x, True)
  np.testing.assert_array_equal(np.asarray(a["last_hidden_state"]),
                                np.asarray(b["last_hidden_state"]))
  with pytest.raises(ValueError, match="interpolate_pos_encoding"):
    VisionModel(cfg).apply({"params": params}, jnp.zeros((1, 42, 42, 3)))


@pytest.mark.parametrize("hw,out_hw", [((2, 2), (3, 3)), ((2, 2), (5, 5)), ((16, 16), (26, 26)),
                                       ((16, 16), (35, 35)), ((7, 5), (3, 9)), ((16, 16), (11, 13))])
def test_bicubic_matches_torch(hw, out_hw):
  """Our resize vs torch bicubic (a=-0.75, align_corners=False), up- and downsampling."""
  x = np.random.default_rng(0).standard_normal((*hw, 8)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=out_hw,
                                        mode="bicubic", align_corners=False)
  ref = ref[0].permute(1, 2, 0).numpy()
  out = np.asarray(vit.resize_bicubic(jnp.asarray(x), out_hw))
  # measured <= 9.5e-7 on values up to ~4 (float32 summation order); jax.image.resize's cubic
  # (a=-0.5) is off by ~1e-1 here.
  assert_close(out, ref, "bicubic")


# ----------------------------------------------------------------------------------------
# scan / remat / dtype / dropout


def test_scan_vs_unrolled(base, tmp_path):
  model, cfg, params = base
  x = nhwc(torch.randn(2, 3, 28, 28))
  ref = apply(cfg, params, x)
  scanned = L.unrolled_to_scan(params)
  assert scanned["encoder"]["layers"]["self_attn"]["qkv"]["kernel"].shape == (2, 44, 132)
  for runtime in (dict(scan=True), dict(scan=True, remat="full"), dict(remat="full")):
    c = dataclasses.replace(cfg, **runtime)
    p = scanned if c.scan else params
    out = apply(c, p, x)
    # measured: bitwise equal under jit (op-by-op, the scanned run differed by 1 ulp)
    for k in ("last_hidden_state", "pooler_output"):
      np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(ref[k]))
  # the loader fills a scanned tree straight from the HF checkpoint
  _, p2 = load(model, tmp_path, scan=True)
  jax.tree.map(np.testing.assert_array_equal, p2, scanned)


def test_bf16(tmp_path):
  model = make_hf()
  cfg, params = load(model, tmp_path, dtype="bfloat16")
  torch.manual_seed(3)
  x = torch.randn(2, 3, 28, 28)
  ref, out = run_both(model, cfg, params, x)
  assert out["last_hidden_state"].dtype == jnp.bfloat16
  mean = float(np.abs(np.asarray(out["last_hidden_state"], np.float32)
                      - ref.last_hidden_state.numpy()).mean())
  # bf16 compute (fp32 params, norm statistics and softmax) vs torch fp32, outputs up to |4.3|:
  # measured max 2.5e-2 / 3.0e-2, mean 5.3e-3 (op-by-op instead of jit: 3.9e-2 / 5.1e-2)
  assert_close(out["last_hidden_state"], ref.last_hidden_state, "bf16 last_hidden_state", rel=BF16_REL)
  assert_close(out["pooler_output"], ref.pooler_output, "bf16 pooler_output", rel=BF16_REL)
  assert mean <= BF16_REL / 4 * float(ref.last_hidden_state.abs().max()), mean  # round-off, not a bias


def test_dropout(base):
  model, cfg, params = base
  cfg = dataclasses.replace(cfg, attention_dropout=0.5)
  torch.manual_seed(4)
  x = torch.randn(2, 3, 28, 28)
  ref, det = run_both(model, cfg, params, x)
  # the deterministic path ignores attention dropout: measured 1.2e-6 / 1.3e-6
  assert_parity(ref, det)
  drop = apply(cfg, params, nhwc(x), dropout_rng=jax.random.PRNGKey(0))
  assert np.abs(np.asarray(drop["last_hidden_state"] - det["last_hidden_state"])).max() > 1e-2


# ----------------------------------------------------------------------------------------
# loading, saving, config


def test_strict_loading_names_deleted_tensor(base, tmp_path):
  model = base[0]
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  del sd["encoder.layers.1.mlp.fc2.bias"]
  io.save_state_dict(str(tmp_path), sd)
  cfg = VisionConfig.from_hf(model.config)
  abstract = io.abstract_params(VisionModel(cfg), jnp.zeros((1, 28, 28, 3)))
  with pytest.raises(io.CheckpointError, match=r"encoder\.layers\.1\.mlp\.fc2\.bias"):
    io.load_params(str(tmp_path), hf_rules(cfg), abstract)
  # a qkv_bias=True checkpoint into a qkv_bias=False model: the fused biases are unexpected
  cfg_nb = dataclasses.replace(cfg, qkv_bias=False)
  sd["encoder.layers.1.mlp.fc2.bias"] = np.zeros(44, np.float32)
  io.save_state_dict(str(tmp_path), sd)
  abstract = io.abstract_params(VisionModel(cfg_nb), jnp.zeros((1, 28, 28, 3)))
  with pytest.raises(io.CheckpointError, match=r"encoder\.layers\.0\.self_attn\.qkv\.bias"):
    io.load_params(str(tmp_path), hf_rules(cfg_nb), abstract)


def test_state_dict_round_trip(base):
  model, cfg, params = base
  sd = io.to_state_dict(params, hf_rules(cfg))
  ref = model.state_dict()
  assert sorted(sd) == sorted(ref)
  for k, v in sd.items():
    np.testing.assert_array_equal(v, ref[k].numpy(), err_msg=k)


def test_config_round_trip_and_errors():
  from transformers import Blip2VisionConfig
  c = VisionConfig(**TINY, hidden_act="quick_gelu", qkv_bias=False, layer_norm_eps=1e-5,
                   scan=True, remat="full", dtype="bfloat16")
  hf = c.to_hf()
  assert isinstance(hf, Blip2VisionConfig) and hf.hidden_act == "quick_gelu"
  runtime = dict(scan=True, remat="full", dtype="bfloat16")
  assert VisionConfig.from_hf(hf, **runtime) == c
  assert VisionConfig.from_hf(hf.to_dict(), **runtime) == c
  assert VisionConfig.from_hf(Blip2VisionConfig()) == VisionConfig()  # ViT-g defaults
  from transformers import Blip2Config
  assert VisionConfig.from_hf(Blip2Config(vision_config=hf.to_dict()), **runtime) == c
  with pytest.raises(ValueError, match="hidden_act"):
    VisionConfig.from_hf(Blip2VisionConfig(hidden_act="nope"))
  with pytest.raises(ValueError, match="num_channels"):
    VisionConfig.from_hf({**hf.to_dict(), "num_channels": 1})
  with pytest.raises(ValueError, match="image_size"):
    VisionConfig.from_hf({**hf.to_dict(), "image_size": [28, 42]})
  with pytest.raises(ValueError, match="num_attention_heads"):
    VisionConfig(hidden_size=45, num_attention_heads=4)


def test_param_axes_and_lavis_bias():
  cfg = VisionConfig(**TINY)
  abstract = io.abstract_params(VisionModel(cfg), jnp.zeros((1, 28, 28, 3)))
  flat = io.flatten(nn.get_partition_spec(abstract))
  assert flat["encoder/layers_0/self_attn/qkv/kernel"] == jax.sharding.PartitionSpec("embed", "heads")
  assert flat["encoder/layers_0/mlp/fc1/kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
  assert flat["embeddings/patch_embedding/kernel"] == jax.sharding.PartitionSpec(None, None, None, "embed")
  q, v = np.arange(3.0), np.arange(3.0) + 10
  np.testing.assert_array_equal(vit.lavis_qkv_bias(q, v), [0, 1, 2, 0, 0, 0, 10, 11, 12])
