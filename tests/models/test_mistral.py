"""Mistral parity against HF transformers (eager attention, float32, tiny random models): every
layer attends over a sliding window (`sliding_window`, here 3-5 positions, shorter than the prompt)
in the full pass, in cached decoding and in generation; head_dim from the config, GQA, tied /
untied heads, no window. Shared checks: tests/lm_parity.py."""
import pytest
import transformers

from blip2_jax.models import llama

import lm_parity as P

CASES = {
    "window3_gqa": dict(num_key_value_heads=2, sliding_window=3),
    "window5_head_dim_tied": dict(num_key_value_heads=1, head_dim=12, sliding_window=5,
                                  tie_word_embeddings=True),
    "no_window": dict(num_key_value_heads=4, sliding_window=None),
}


def _model(case, tmp_path):
  return P.build("MistralForCausalLM", "MistralConfig", "mistral", CASES[case], tmp_path)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, tmp_path):
  m, lm, params = _model(case, tmp_path)
  window = CASES[case]["sliding_window"]
  assert lm.config.windows == (None if window is None else (window,) * 3)
  # measured max abs diff: window3_gqa 2.7e-6, window5_head_dim_tied 2.7e-6, no_window 3.0e-6
  # (logits up to 3.3-3.9)
  P.check_logits(m, lm, params)


def test_generation_scan_and_strict_loading(tmp_path):
  m, lm, params = _model("window3_gqa", tmp_path)
  assert lm.config.windows == (3, 3, 3)
  P.check_generation(m, lm, params)  # step logits vs HF output_logits, measured 4.2e-6
  P.check_scan(lm, params, tmp_path)  # measured 0
  P.check_strict_loading(m, lm, params, "lm_head.weight", "model.layers.1.self_attn.v_proj.weight")


def test_config():
  cfg = llama.MistralConfig.from_hf(transformers.MistralConfig(head_dim=96))
  assert (cfg.head_dim, cfg.sliding_window, cfg.num_key_value_heads) == (96, 4096, 8)
  assert llama.MistralConfig.from_hf(cfg.to_hf()) == cfg
  assert not (cfg.qkv_bias or cfg.o_bias or cfg.gate_bias)
  with pytest.raises(ValueError, match="hidden_act"):
    llama.MistralConfig.from_hf({**transformers.MistralConfig().to_dict(), "hidden_act": "nope"})
