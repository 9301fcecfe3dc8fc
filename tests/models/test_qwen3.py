"""Qwen3 parity against HF transformers (eager attention, float32, tiny random models): RMSNorm on
each query / key head before RoPE, head_dim from the config (not hidden / heads), attention_bias,
GQA, tied / untied heads, sliding windows shorter than the prompt. Shared checks: tests/lm_parity.py."""
import pytest
import transformers

from blip2_jax.models import llama

import lm_parity as P

CASES = {
    "head_dim_gqa": dict(num_key_value_heads=2, head_dim=12),  # 4 x 12 != 64
    "bias_tied": dict(num_key_value_heads=4, head_dim=16, attention_bias=True, tie_word_embeddings=True),
    "window": dict(num_key_value_heads=2, head_dim=20, use_sliding_window=True, sliding_window=4,
                   max_window_layers=1),
}


def _model(case, tmp_path):
  return P.build("Qwen3ForCausalLM", "Qwen3Config", "qwen3", CASES[case], tmp_path)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, tmp_path):
  m, lm, params = _model(case, tmp_path)
  assert lm.config.qk_norm and lm.config.head_dim == CASES[case]["head_dim"]
  # measured max abs diff: head_dim_gqa 3.0e-6, bias_tied 2.7e-6, window 2.6e-6 (logits up to 3.5-4)
  P.check_logits(m, lm, params)


def test_generation_scan_and_strict_loading(tmp_path):
  m, lm, params = _model("window", tmp_path)
  P.check_generation(m, lm, params)  # step logits vs HF output_logits, measured 2.4e-6
  P.check_scan(lm, params, tmp_path)  # measured 0
  P.check_strict_loading(m, lm, params, "model.layers.1.self_attn.k_norm.weight",
                         "model.layers.0.self_attn.q_norm.weight")


def test_config():
  hf = transformers.Qwen3Config(head_dim=64, num_key_value_heads=8, attention_bias=True)
  cfg = llama.Qwen3Config.from_hf(hf)
  assert (cfg.head_dim, cfg.qkv_bias, cfg.o_bias, cfg.gate_bias) == (64, True, True, False)
  assert llama.Qwen3Config.from_hf(cfg.to_hf()) == cfg
  with pytest.raises(ValueError, match="partial_rotary_factor"):
    llama.Qwen3Config.from_hf(transformers.Qwen3Config(
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}))
