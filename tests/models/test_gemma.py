"""Gemma 2 and Gemma 3 (text) parity against HF transformers (eager attention, float32, tiny random
models): (1 + w) RMSNorms around attention and MLP, embeddings times sqrt(hidden), query_pre_attn_scalar,
attention and final logit soft-capping (Gemma 2; Gemma 3's final cap), alternating local (sliding,
shorter than the prompt) / global layers, Gemma 3's q / k norms and its two RoPE bases (local
`rope_local_base_freq`, global rope_theta with linear scaling), GQA, head_dim, tied / untied heads.
Shared checks: tests/lm_parity.py."""
import numpy as np
import pytest
import torch
import transformers

from blip2_jax.models import gemma

import lm_parity as P

G3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
           "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
CASES = {  # name -> (model class, config class, options)
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=20,
        attn_logit_softcapping=3.0, final_logit_softcapping=2.0)),
    "gemma2_no_caps_untied": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        num_key_value_heads=4, head_dim=12, sliding_window=3, attn_logit_softcapping=None,
        final_logit_softcapping=None, tie_word_embeddings=False, hidden_activation="gelu")),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=20,
        final_logit_softcapping=2.0, sliding_window_pattern=2, rope_parameters=G3_ROPE)),
    # HF 5.23's Gemma 3 attention does not apply attn_logit_softcapping: nor do we
    "gemma3_pattern6_attn_cap": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        num_hidden_layers=7, num_key_value_heads=1, head_dim=12, sliding_window=5,
        attn_logit_softcapping=1.0)),
}
FAMILY = {"Gemma2Config": "gemma2", "Gemma3TextConfig": "gemma3"}


def _model(case, tmp_path):
  model_cls, cfg_cls, kw = CASES[case]
  return P.build(model_cls, cfg_cls, FAMILY[cfg_cls], kw, tmp_path)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, tmp_path):
  m, lm, params = _model(case, tmp_path)
  assert lm.config.norm_offset == 1.0 and lm.config.embed_scale == 8.0
  # measured max abs diff: gemma2 2.7e-6, gemma2_no_caps_untied 2.0e-6, gemma3 1.5e-6,
  # gemma3_pattern6_attn_cap 3.6e-6 (logits up to 2 with the final caps, 3.5-4.2 without)
  P.check_logits(m, lm, params)


def test_embeddings_are_scaled_as_hf(tmp_path):
  m, lm, params = _model("gemma2", tmp_path)
  ids = torch.arange(3, 10)[None]
  with torch.no_grad():
    ref = m.get_input_embeddings()(ids).numpy()
  got = lm.apply({"params": params}, ids.numpy(), method="embed_tokens")
  np.testing.assert_array_equal(np.asarray(got), ref)  # sqrt(64) = 8: exact


def test_bfloat16(tmp_path):
  """bf16 weights and compute against float32 torch."""
  model_cls, cfg_cls, kw = CASES["gemma2"]
  m = P.make_hf(model_cls, cfg_cls, gemma_norms=True, **kw)
  lm, params = P.load(m, tmp_path, "gemma2", dtype="bfloat16", param_dtype="bfloat16")
  ids, mask = P.batch()
  with torch.no_grad():
    ref = m(input_ids=ids, attention_mask=mask).logits.numpy()
  keep = mask.numpy().astype(bool)
  # measured 0.049 against float32 torch (soft-capped logits up to 2)
  P.assert_close(P.logits(lm, params, ids, mask)[keep], ref[keep], "bf16 logits", rel=P.BF16_WEIGHTS_REL)


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_generation_scan_and_strict_loading(case, tmp_path):
  m, lm, params = _model(case, tmp_path)
  assert lm.config.windows == (4, None, 4)
  P.check_generation(m, lm, params)  # step logits vs HF output_logits, measured 1.5e-6 / 1.7e-6
  P.check_scan(lm, params, tmp_path)  # mixed local / global layers (kinds scanned): measured 0 / 0
  P.check_strict_loading(m, lm, params, "model.layers.2.pre_feedforward_layernorm.weight",
                         "model.layers.1.post_feedforward_layernorm.weight")


def test_config():
  g2 = gemma.Gemma2Config.from_hf(transformers.Gemma2Config(num_hidden_layers=4))
  assert g2.windows == (4096, None, 4096, None) and g2.hidden_act == "gelu_pytorch_tanh"
  assert (g2.attn_softcap, g2.final_logit_softcapping, g2.attn_scale) == (50.0, 30.0, 256 ** -0.5)
  assert gemma.Gemma2Config.from_hf(g2.to_hf()) == g2
  g3 = gemma.Gemma3TextConfig.from_hf(transformers.Gemma3TextConfig(num_hidden_layers=7))
  assert g3.windows == (4096,) * 5 + (None, 4096) and g3.attn_softcap is None and g3.qk_norm
  assert (g3.rope_theta, g3.rope_local_theta) == (1e6, 1e4)
  assert gemma.Gemma3TextConfig.from_hf(g3.to_hf()) == g3
  # the text config inside a Gemma 3 composite
  comp = transformers.Gemma3Config(text_config=g3.to_hf().to_dict())
  assert gemma.Gemma3TextConfig.from_hf(comp) == g3 == gemma.Gemma3TextConfig.from_hf(comp.to_dict())
  with pytest.raises(ValueError, match="use_bidirectional_attention"):
    gemma.Gemma3TextConfig.from_hf(transformers.Gemma3TextConfig(use_bidirectional_attention=True))
  with pytest.raises(ValueError, match="sliding_attention.rope_type 'linear'"):
    gemma.Gemma3TextConfig.from_hf(transformers.Gemma3TextConfig(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}))
  with pytest.raises(ValueError, match="hidden_activation"):
    gemma.Gemma2Config.from_hf({**transformers.Gemma2Config().to_dict(), "hidden_activation": "nope"})
