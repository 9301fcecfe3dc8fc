"""Qwen2 / Qwen2.5 parity against HF transformers (eager attention, float32, tiny random models):
q / k / v biases without an o bias, GQA, tied / untied heads, sliding windows (HF 5.23:
`use_sliding_window` + `max_window_layers`, or explicit `layer_types`) shorter than the prompt,
in the full pass, in cached decoding and in generation. Shared checks: tests/lm_parity.py."""
import pytest
import transformers

from blip2_jax.models import llama

import lm_parity as P

CASES = {
    "gqa_untied": dict(num_key_value_heads=2),
    "tied_mqa": dict(num_key_value_heads=1, tie_word_embeddings=True),
    # layers 1, 2 slide over 4 positions (prompt 9-11 tokens)
    "window_max_layers": dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                              max_window_layers=1),
    "window_layer_types": dict(num_key_value_heads=4, use_sliding_window=True, sliding_window=3,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "window_unused": dict(num_key_value_heads=4, sliding_window=3),  # without use_sliding_window HF reads None: global
}


def _model(case, tmp_path):
  return P.build("Qwen2ForCausalLM", "Qwen2Config", "qwen2", CASES[case], tmp_path)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, tmp_path):
  m, lm, params = _model(case, tmp_path)
  assert lm.config.qkv_bias and not lm.config.o_bias
  # measured max abs diff: gqa_untied 2.6e-6, tied_mqa 2.9e-6, window_max_layers 2.6e-6,
  # window_layer_types 2.1e-6, window_unused 2.3e-6 (logits up to 3.1-3.9)
  P.check_logits(m, lm, params)


def test_generation_scan_and_strict_loading(tmp_path):
  m, lm, params = _model("window_max_layers", tmp_path)
  assert lm.config.windows == (None, 4, 4)
  P.check_generation(m, lm, params)  # step logits vs HF output_logits, measured 3.6e-6
  P.check_scan(lm, params, tmp_path)  # mixed global / sliding layers (kinds scanned): measured 0
  P.check_strict_loading(m, lm, params, "model.layers.0.self_attn.k_proj.bias",
                         "model.layers.2.mlp.up_proj.weight")


def test_config():
  hf = transformers.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=8,
                                max_window_layers=2, eos_token_id=[5, 6])
  cfg = llama.Qwen2Config.from_hf(hf)
  assert cfg.windows == (None, None, 8, 8) and cfg.eos_token_id == (5, 6)
  assert llama.Qwen2Config.from_hf(hf.to_dict()) == cfg
  assert llama.Qwen2Config.from_hf(transformers.Qwen2Config(sliding_window=8)).windows is None
  with pytest.raises(ValueError, match="sliding_window is not set"):
    llama.Qwen2Config(num_hidden_layers=2, layer_types=("sliding_attention", "full_attention"))
  with pytest.raises(ValueError, match="'chunked_attention'"):
    llama.Qwen2Config(num_hidden_layers=1, layer_types=("chunked_attention",))
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    llama.Qwen2Config.from_hf(transformers.Qwen2Config(
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                         "original_max_position_embeddings": 32768}))
  with pytest.raises(ValueError, match="model_type: expected 'qwen2', got 'llama'"):
    llama.Qwen2Config.from_hf(transformers.LlamaConfig())
