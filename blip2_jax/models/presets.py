"""Shapes of the released BLIP-2 / InstructBLIP models as transformers configs, with no download.

One table per tower (HF config dicts) and one per composite; recipes name a composite in
`config.model.preset`, so the ahead-of-time compiler (`python -m blip2_jax.aot`) and the benchmarks
build real-size models without reading a checkpoint.

    cfg = presets.hf_config("blip2-opt-2.7b")        # a transformers Blip2Config
    presets.hf_config("blip2-itm-vit-g")             # stage 1: ViT-g + Q-Former with its text path

Sources: the HF configs of Salesforce/blip2-* and instructblip-* (vocabularies as there: OPT 50304,
Q-Former 30523 with [DEC], Vicuna 32001 with its pad token), LAVIS 1.0.2 for the towers HF does not
ship (CLIP ViT-L/14: 23 of its 24 layers, as LAVIS `pretrain_vitL`), ../shared/REFERENCE.md.
"""
from __future__ import annotations

import copy

# ----------------------------------------------------------------------------------------
# towers

VISION = {
    # EVA ViT-g/14: 39 of EVA-CLIP-g's 40 blocks, 16 heads of 88, 224 px -> 257 tokens
    "eva-vit-g": dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                      image_size=224, patch_size=14, hidden_act="gelu", qkv_bias=True, layer_norm_eps=1e-6),
    # CLIP ViT-L/14 as LAVIS uses it (23 of 24 layers). Shapes and FLOPs only: CLIP's ln_pre and
    # full qkv bias are not modelled by models/vit.py, so no checkpoint of it loads.
    "clip-vit-l": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="quick_gelu", qkv_bias=True, layer_norm_eps=1e-5),
}

# BERT-base with cross-attention every 2nd layer; vocab 30522 + [DEC]; encoder width set per ViT.
QFORMER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               cross_attention_frequency=2, vocab_size=30523, max_position_embeddings=512,
               layer_norm_eps=1e-12, hidden_act="gelu")

_OPT = dict(model_type="opt", max_position_embeddings=2048, pad_token_id=1, bos_token_id=2, eos_token_id=2,
            do_layer_norm_before=True, activation_function="relu", vocab_size=50304)
_T5 = dict(model_type="t5", d_kv=64, vocab_size=32128, feed_forward_proj="gated-gelu", dense_act_fn="gelu",
           is_gated_act=True, tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
           eos_token_id=1, relative_attention_num_buckets=32, relative_attention_max_distance=128)
_LLAMA = dict(model_type="llama", vocab_size=32001, max_position_embeddings=2048, rms_norm_eps=1e-6,
              hidden_act="silu", pad_token_id=32000, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

TEXT = {
    "opt-2.7b": dict(_OPT, hidden_size=2560, word_embed_proj_dim=2560, ffn_dim=10240, num_hidden_layers=32,
                     num_attention_heads=32),
    "opt-6.7b": dict(_OPT, hidden_size=4096, word_embed_proj_dim=4096, ffn_dim=16384, num_hidden_layers=32,
                     num_attention_heads=32),
    "flan-t5-xl": dict(_T5, d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32),
    "flan-t5-xxl": dict(_T5, d_model=4096, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64),
    "vicuna-7b": dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "vicuna-13b": dict(_LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40),
}

# HF v5's <image> placeholder id per LLM (OPT: blip2-opt-*; the others: the last added id)
IMAGE_TOKEN = {"opt-2.7b": 50265, "opt-6.7b": 50265, "flan-t5-xl": 32100, "flan-t5-xxl": 32100,
               "vicuna-7b": 32000, "vicuna-13b": 32000}

# ----------------------------------------------------------------------------------------
# composites: name -> (vision, LLM or None for the stage-1 / retrieval model, InstructBLIP?)

PRESETS = {
    "blip2-itm-vit-g": ("eva-vit-g", None, False),
    "blip2-itm-vit-l": ("clip-vit-l", None, False),
    "blip2-opt-2.7b": ("eva-vit-g", "opt-2.7b", False),
    "blip2-opt-6.7b": ("eva-vit-g", "opt-6.7b", False),
    "blip2-flan-t5-xl": ("eva-vit-g", "flan-t5-xl", False),
    "blip2-flan-t5-xxl": ("eva-vit-g", "flan-t5-xxl", False),
    "blip2-vicuna-7b": ("eva-vit-g", "vicuna-7b", False),
    "instructblip-vicuna-7b": ("eva-vit-g", "vicuna-7b", True),
    "instructblip-vicuna-13b": ("eva-vit-g", "vicuna-13b", True),
    "instructblip-flan-t5-xl": ("eva-vit-g", "flan-t5-xl", True),
    "instructblip-flan-t5-xxl": ("eva-vit-g", "flan-t5-xxl", True),
}


def text_config(name: str):
  """A transformers OPTConfig / T5Config / LlamaConfig of the LLM `name` (a TEXT key)."""
  import transformers
  if name not in TEXT:
    raise ValueError(f"unknown LLM {name!r}; known: {sorted(TEXT)}")
  d = dict(TEXT[name])
  return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


def hf_config(name: str, *, num_query_tokens: int = 32):
  """The transformers Blip2Config / InstructBlipConfig of the preset `name` (a PRESETS key)."""
  import transformers
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  vision, llm, instruct = PRESETS[name]
  q = dict(QFORMER, encoder_hidden_size=VISION[vision]["hidden_size"])
  kw = dict(vision_config=copy.deepcopy(VISION[vision]), num_query_tokens=num_query_tokens)
  if llm is not None:
    kw["text_config"] = text_config(llm).to_dict()
  if instruct:
    cfg = transformers.InstructBlipConfig(qformer_config=q, **kw)
  else:
    # only the stage-1 / retrieval Q-Former reads text (LAVIS stage 2 drops the text path)
    cfg = transformers.Blip2Config(qformer_config=dict(q, use_qformer_text_input=llm is None), **kw)
  if llm is not None:
    cfg.image_token_index = IMAGE_TOKEN[llm]
  cfg.architectures = ["Blip2ForImageTextRetrieval" if llm is None else
                       "InstructBlipForConditionalGeneration" if instruct else "Blip2ForConditionalGeneration"]
  return cfg
