"""Composite parity: every BLIP-2 class against transformers on tiny random checkpoints (float32).

Measured max abs diffs (CPU, jax 0.10.2 vs torch 2.13 eager, batch 3 with padding; vision states
up to 4, Q-Former up to 3, logits up to 3):
  every class: vision 2.1e-6, qformer <= 1.9e-6, projection <= 1.2e-7
  logits: OPT 1.3e-6, T5 1.8e-6, LLaMA 2.5e-6, InstructBLIP T5 2.0e-6 / LLaMA 1.7e-6
  retrieval: ITC 6.0e-8, ITM 1.5e-8, image/text embeds <= 1.8e-7
  scanned: vision 2.9e-6; 42 / 70 px interpolation: vision 2.1e-6 / 3.0e-6
For T5 we also checked against a float64 torch run: ours 1.3e-6 from it, torch float32 1.4e-6.
"""
import pytest

from blip2_jax.checkpoints import parity, tiny

from bounds import BF16_REL, REL


def _check(rows, rel=REL):
  """Each stage within rel x max(1, max |torch|) (tests/bounds.py); measured figures above."""
  bad = [(n, mx) for n, mx, _, ref in rows if not mx <= rel * max(1.0, ref)]
  assert not bad, f"above {rel:g} x max(1, |torch|): {bad}; all: {rows}"


@pytest.mark.parametrize("arch,family", [
    ("Blip2ForConditionalGeneration", "opt"),
    ("Blip2ForConditionalGeneration", "t5"),
    ("Blip2ForConditionalGeneration", "llama"),
    ("Blip2Model", "opt"),
    ("InstructBlipForConditionalGeneration", "t5"),
    ("InstructBlipForConditionalGeneration", "llama"),
    ("Blip2ForImageTextRetrieval", None),
    ("Blip2VisionModelWithProjection", None),
    ("Blip2TextModelWithProjection", None),
])
def test_composite_matches_torch(tiny_checkpoint, arch, family):
  d = tiny_checkpoint(arch, family)
  rows = parity.compare(d, batch=3)
  names = {r[0] for r in rows}
  if "ForConditionalGeneration" in arch or arch == "Blip2Model":
    assert {"vision", "qformer", "projection", "logits"} <= names
  _check(rows)


def test_scanned_composite_matches_torch(tiny_checkpoint):
  d = tiny_checkpoint()
  _check(parity.compare(d, scan=True))


def test_bfloat16_composite(tiny_checkpoint):
  # Both sides in bf16 (HF keeps the Q-Former in fp32, as we do). Measured: vision 4.7e-2 (values
  # up to 4.0), qformer 2.1e-2, projection 7.8e-3, logits 3.1e-2 (up to 3.3): bf16 has 8 mantissa
  # bits, and torch and XLA round their bf16 matmuls differently.
  d = tiny_checkpoint()
  _check(parity.compare(d, dtype="bfloat16"), rel=BF16_REL)


@pytest.mark.parametrize("size", [42, 70])  # 1.5x and 2.5x the 28 px training size (224 -> 364 / 490 px analogues)
def test_interpolated_resolution_matches_torch(tiny_checkpoint, size):
  d = tiny_checkpoint()
  _check(parity.compare(d, image_size=size))


@pytest.mark.parametrize("family", ["opt", "t5", "llama"])
@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_logical_axes(family, scan):
  import flax.linen as nn
  import jax

  from blip2_jax.checkpoints import io
  from blip2_jax.models import blip2
  cfg = blip2.Blip2Config.from_hf(tiny.tiny_blip2_config(family), scan=scan,
                                  architecture="Blip2ForConditionalGeneration")
  abstract = io.abstract_params(blip2.build(cfg), **blip2.dummy_inputs(cfg))
  leaves = jax.tree_util.tree_leaves_with_path(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  bad = [jax.tree_util.keystr(p) for p, x in leaves
         if not isinstance(x, nn.Partitioned) or len(x.names) != len(x.value.shape)]
  assert leaves and not bad, bad
  if scan:  # stacked leaves carry the "layers" axis first
    stacked = [x for _, x in leaves if "layers" in x.names]
    assert stacked and all(x.names[0] == "layers" for x in stacked)
