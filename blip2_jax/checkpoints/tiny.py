"""Tiny random Hugging Face BLIP-2 checkpoints, built locally (no hub), for tests and demos.

Needs torch and transformers (`pip install -e .[test]`).
"""
from __future__ import annotations

import os

FAMILIES = ("opt", "t5", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3")
ARCHS = ("Blip2ForConditionalGeneration", "Blip2Model", "Blip2ForImageTextRetrieval",
         "Blip2VisionModelWithProjection", "Blip2TextModelWithProjection",
         "InstructBlipForConditionalGeneration")

VOCAB = 120  # LLM vocab; the last id is the <image> placeholder


def tiny_text_config(family: str, **overrides):
  import transformers
  if family == "opt":
    kw = dict(hidden_size=40, ffn_dim=72, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
              max_position_embeddings=64, word_embed_proj_dim=40, pad_token_id=1, bos_token_id=2,
              eos_token_id=2, init_std=0.15)  # larger than 0.02 so logits are of order 1
    kw.update(overrides)
    return transformers.OPTConfig(**kw)
  if family == "t5":
    kw = dict(d_model=40, d_ff=72, d_kv=12, num_layers=2, num_heads=4, vocab_size=VOCAB,
              feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=True,
              relative_attention_num_buckets=8, relative_attention_max_distance=20,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    kw.update(overrides)
    return transformers.T5Config(**kw)
  if family == "llama":
    kw = dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
              tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              initializer_range=0.15)
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)
  if family in LLAMA_LIKE:
    # 4 query slots + a prompt: windows of 5 / 6 are shorter than what the layers see
    cls, own = LLAMA_LIKE[family]
    kw = dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, initializer_range=0.15)
    kw.update(own, **overrides)
    return getattr(transformers, cls)(**kw)
  raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


_GEMMA = dict(head_dim=12, query_pre_attn_scalar=16, sliding_window=5, pad_token_id=0, eos_token_id=1,
              bos_token_id=2, final_logit_softcapping=3.0, tie_word_embeddings=True)
# family -> (transformers config class, what the tiny model sets beyond the common fields)
LLAMA_LIKE = {
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                  tie_word_embeddings=True, bos_token_id=None)),
    "qwen3": ("Qwen3Config", dict(head_dim=12, tie_word_embeddings=True, bos_token_id=None)),
    "mistral": ("MistralConfig", dict(head_dim=12, sliding_window=6, tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", dict(_GEMMA, attn_logit_softcapping=2.0)),
    "gemma3": ("Gemma3TextConfig", dict(_GEMMA, sliding_window_pattern=2, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
}


def tiny_blip2_config(family: str | None = "opt", *, instruct: bool = False, num_query_tokens: int = 4,
                      image_size: int = 28, cross_attention_frequency: int = 2, text_overrides=None,
                      vision_overrides=None, qformer_overrides=None):
  """ViT with head dim 11 (odd, like ViT-g's 88), a 4-layer Q-Former, and a 2-layer LLM."""
  import transformers
  vision = dict(hidden_size=44, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                image_size=image_size, patch_size=14, qkv_bias=True, layer_norm_eps=1e-6)
  vision.update(vision_overrides or {})
  qf = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            encoder_hidden_size=vision["hidden_size"], vocab_size=99,
            cross_attention_frequency=cross_attention_frequency, max_position_embeddings=64)
  qf.update(qformer_overrides or {})
  kw = dict(vision_config=vision, num_query_tokens=num_query_tokens)
  text = tiny_text_config(family, **(text_overrides or {})) if family else None
  if text is not None:
    kw["text_config"] = text.to_dict()
  if instruct:
    kw["qformer_config"] = qf
    cfg = transformers.InstructBlipConfig(**kw)
  else:
    kw["qformer_config"] = dict(qf, use_qformer_text_input=family is None)
    cfg = transformers.Blip2Config(image_text_hidden_size=24, **kw)
  if text is not None:
    cfg.image_token_index = VOCAB - 1
    if instruct:
      cfg.image_token_id = VOCAB - 1
  return cfg


def perturb_(model, seed: int = 0, scale: float = 0.3):
  """Moves every parameter off its init (norm weights 1, biases 0, zero query tokens) so a
  parity test can fail when a norm, bias or scale is dropped."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      # Relative to each tensor's spread, so weights keep their conditioning (T5's unscaled
      # attention turns large absolute noise into float32 round-off of 1e-4); constant tensors
      # (norm weights, biases, zero query tokens) get absolute noise.
      spread = float(p.std()) if p.numel() > 1 else 0.0
      std = scale * spread if spread > 1e-3 else scale
      p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
  return model


def save_tiny(path: str, arch: str = "Blip2ForConditionalGeneration", family: str | None = "opt",
              seed: int = 0, tokenizer: bool = True, **config_kw) -> str:
  """Builds a tiny random HF model of class `arch`, saves it (and a word-level tokenizer for its
  LLM, or a BERT-style one for retrieval models) to `path`, returns the path. BLIP architectures
  go to `save_tiny_blip` (`family` unused)."""
  import torch
  import transformers
  if arch in BLIP_ARCHS:  # BLIP (no family)
    return save_tiny_blip(path, arch, seed, tokenizer, **config_kw)
  if arch in ("Blip2ForImageTextRetrieval", "Blip2VisionModelWithProjection", "Blip2TextModelWithProjection"):
    family = None
  cfg = tiny_blip2_config(family, instruct=arch.startswith("InstructBlip"), **config_kw)
  torch.manual_seed(seed)
  model = getattr(transformers, arch)(cfg).eval()
  perturb_(model, seed)
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path)
  if tokenizer:
    tiny_tokenizer(family).save_pretrained(path)
    if arch.startswith("InstructBlip"):  # InstructBlipProcessor's layout
      tiny_tokenizer("bert").save_pretrained(os.path.join(path, "qformer_tokenizer"))
  return path



# ----------------------------------------------------------------------------------------
# CLIP (the CapFilt ranker)

CLIP_MERGES = (("p", "h"), ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>"), ("c", "a"), ("ca", "t</w>"),
               ("d", "o"), ("do", "g</w>"))


def tiny_clip_tokenizer():
  """A CLIPTokenizer built here: the 256 byte-level symbols, each also with CLIP's `</w>` end-of-word
  suffix, a few merges, then <|startoftext|> and <|endoftext|> (the largest id, as in OpenAI's vocab,
  so the legacy argmax pooling finds it); 77-token context."""
  import transformers
  from tokenizers import pre_tokenizers
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {t: i for i, t in enumerate(alphabet + [c + "</w>" for c in alphabet])}
  for a, b in CLIP_MERGES:
    vocab.setdefault(a + b, len(vocab))
  for special in ("<|startoftext|>", "<|endoftext|>"):
    vocab[special] = len(vocab)
  return transformers.CLIPTokenizer(vocab=vocab, merges=list(CLIP_MERGES), model_max_length=77)


def tiny_clip_config(*, text_overrides=None, vision_overrides=None, projection_dim: int = 24):
  """A 2-layer CLIP (text 32 wide, 16 positions; vision head dim 11, 28 px / patch 14) sized for
  `tiny_clip_tokenizer` (eos = pad = its <|endoftext|>)."""
  import transformers
  vocab = len(tiny_clip_tokenizer())
  text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=16, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
  vision = dict(hidden_size=44, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                patch_size=14)
  return transformers.CLIPConfig(text_config=dict(text, **(text_overrides or {})),
                                 vision_config=dict(vision, **(vision_overrides or {})), projection_dim=projection_dim)


def save_tiny_clip(path: str, seed: int = 0, tokenizer: bool = True, **config_kw) -> str:
  """Builds a tiny random HF CLIPModel (every weight moved off its init), saves it with its tokenizer
  and CLIP image processor (shorter side to image_size, centre crop) to `path`; returns the path."""
  import torch
  import transformers
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  cfg = tiny_clip_config(**config_kw)
  torch.manual_seed(seed)
  model = transformers.CLIPModel._from_config(cfg, attn_implementation="eager").eval()
  perturb_(model, seed)
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path)
  if tokenizer:
    tiny_clip_tokenizer().save_pretrained(path)
    s = cfg.vision_config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s}).save_pretrained(path)
  return path

WORDS = ("a photo of the an in on with and is are cat dog bird car tree red blue green yellow "
         "black white small big two three one four man woman person sitting standing next to "
         "table grass street sky water field picture image question answer short what how many "
         "color there this that at near under over front behind left right top bottom circle "
         "square triangle shape round large tiny old young playing running eating holding looking "
         "orange purple brown pink gray house road boat train plane horse cow sheep circles squares "
         "triangles").split()


def _word_tokenizer(vocab_size: int, specials: dict, template: str | None, **tok_kw):
  """A word-level fast tokenizer over WORDS (+ filler words) with `specials` at fixed ids."""
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  vocab = dict(specials)
  words = iter(list(WORDS) + [f"w{i}" for i in range(vocab_size)])
  for i in range(vocab_size):
    if i not in vocab.values():
      w = next(words)
      while w in vocab:
        w = next(words)
      vocab[w] = i
  unk = tok_kw.get("unk_token", next(iter(specials)))
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  if template:
    special_ids = [(t, vocab[t]) for t in specials if t in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=special_ids)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **tok_kw)


def tiny_tokenizer(family: str | None):
  """Word-level tokenizers with the special-token layout of each family (ids as the tiny configs):
  OPT (pad 1, bos = eos 2, BOS prepended), LLaMA / Mistral (pad 0, bos 1, eos 2, BOS prepended),
  Qwen2 / 3 (pad 0, eos 2, no BOS), Gemma 2 / 3 (pad 0, eos 1, bos 2, BOS prepended), T5 (pad 0,
  eos 1 appended), and a BERT-style one for the Q-Former ([PAD] 0 ... [CLS] text [SEP])."""
  if family == "opt":
    return _word_tokenizer(VOCAB, {"<pad>": 1, "</s>": 2, "<unk>": 3, "<image>": VOCAB - 1}, "</s> $A",
                           pad_token="<pad>", bos_token="</s>", eos_token="</s>", unk_token="<unk>")
  if family in ("llama", "mistral"):
    return _word_tokenizer(VOCAB, {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": VOCAB - 1},
                           "<s> $A", pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
  if family in ("qwen2", "qwen3"):  # Qwen's tokenizer adds no BOS
    return _word_tokenizer(VOCAB, {"<|pad|>": 0, "<|endoftext|>": 2, "<unk>": 3, "<image>": VOCAB - 1},
                           None, pad_token="<|pad|>", eos_token="<|endoftext|>", unk_token="<unk>")
  if family in ("gemma2", "gemma3"):
    return _word_tokenizer(VOCAB, {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<image>": VOCAB - 1},
                           "<bos> $A", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
  if family == "t5":
    return _word_tokenizer(VOCAB, {"<pad>": 0, "</s>": 1, "<unk>": 2, "<image>": VOCAB - 1}, "$A </s>",
                           pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
  if family is None or family == "bert":
    return _word_tokenizer(99, {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "[DEC]": 98},
                           "[CLS] $A [SEP]", pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                           sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]")
  raise ValueError(f"unknown family {family!r}")



# ----------------------------------------------------------------------------------------
# BLIP (models/blip.py): the CapFilt captioner and filter

BLIP_ARCHS = ("BlipForConditionalGeneration", "BlipForImageTextRetrieval")
BLIP_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, then WORDS; [DEC] 98, [ENC] 99


def tiny_blip_config(**text_overrides):
  """A 2-layer BLIP: ViT 44 wide (head dim 11), BERT text 32 wide, vocab 100 = 98 wordpieces + [DEC]
  (bos, 98) + [ENC] (99), [SEP] 3, [PAD] 0. Weights ~N(0, 0.2), about 1 / sqrt(width): logits span
  several units and stay well conditioned (at 0.5, float32 round-off grew past 1e-5)."""
  import transformers
  text = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=40, bos_token_id=98, sep_token_id=3, pad_token_id=0, eos_token_id=2,
              initializer_range=0.2)
  text.update(text_overrides)
  vision = dict(hidden_size=44, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                patch_size=14)
  return transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=24,
                                 initializer_range=0.2)


def tiny_blip_tokenizer(directory: str):
  """BLIP's tokenizer as its processor builds it: a BERT wordpiece tokenizer (vocab.txt written to
  `directory`: the specials, then WORDS) with [DEC] added as bos and [ENC] as an extra special."""
  import transformers
  os.makedirs(directory, exist_ok=True)
  vocab = os.path.join(directory, "vocab.txt")
  with open(vocab, "w") as f:
    f.write("\n".join((*BLIP_SPECIALS, *WORDS)) + "\n")
  tok = transformers.BertTokenizer.from_pretrained(directory, do_lower_case=True)
  tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
  return tok


def save_tiny_blip(path: str, arch: str = "BlipForConditionalGeneration", seed: int = 0, tokenizer: bool = True,
                   sep_bias: float = 3.5, **text_overrides) -> str:
  """A tiny random HF BLIP model of class `arch` (and its tokenizer) saved to `path`. The captioner's
  image path is strengthened and its LM head's constant parts damped, so that captions differ per
  image, and [SEP]'s bias raised by `sep_bias` so that some end early."""
  import torch
  import transformers
  if arch not in BLIP_ARCHS:
    raise ValueError(f"unknown BLIP architecture {arch!r}; choose from {BLIP_ARCHS}")
  torch.manual_seed(seed)
  model = getattr(transformers, arch)(tiny_blip_config(**text_overrides)).eval()
  perturb_(model, seed)
  if arch == "BlipForConditionalGeneration":
    head = model.text_decoder.cls.predictions
    with torch.no_grad():
      for name, p in model.named_parameters():
        if ".crossattention." in name and name.endswith("weight") and "LayerNorm" not in name:
          p.mul_(3.0)
      head.transform.LayerNorm.bias.mul_(0.1)
      head.bias.mul_(0.3)
      head.bias[model.config.text_config.sep_token_id] += sep_bias
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path)
  if tokenizer:
    tiny_blip_tokenizer(path).save_pretrained(path)
  return path

# Questions / instructions over the generated scenes (blip2_jax.data.synthetic) for fine-tuning demos.
