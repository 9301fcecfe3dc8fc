"""Helpers the side-by-side benchmarks share: the machine line, interleaved timing, the sizes.

Every benchmark runs ours and the PyTorch reference in ONE process, in turn (A, B, A, B, ...), so
load from other processes hits both alike, and reports medians; the load average is printed
before and after, since a shared CPU swings timings by several x.
"""
from __future__ import annotations

import os
import platform
import statistics
import time

from blip2_jax.models import presets


def loadavg() -> str:
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "n/a"


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_line(torch_threads: int | None = None) -> str:
  import jax
  import torch
  import transformers
  d = jax.devices()[0]
  tdev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
  return (f"jax {jax.__version__} on {d.platform} ({d.device_kind}), torch {torch.__version__} on {tdev} "
          f"({torch_threads or torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"{os.cpu_count()} CPUs ({cpu_name()}), python {platform.python_version()}, load average {loadavg()}")


def interleaved(fns: dict, repeats: int, sync=None) -> dict:
  """{name: fn} -> {name: [seconds] * repeats}, the functions called in turn each round.
  `sync(name, result)` waits for asynchronous work (jax.block_until_ready, cuda synchronize)."""
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      out = fn()
      if sync is not None:
        sync(name, out)
      times[name].append(time.perf_counter() - t0)
  return times


def med(ts) -> float:
  return statistics.median(ts)


def fmt_times(ts) -> str:
  return "[" + ", ".join(f"{t:.3f}" for t in ts) + "]"


def torch_sync(_name=None, out=None):
  import torch
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def set_torch_threads(n: int | None):
  import torch
  torch.set_num_threads(n or os.cpu_count())
  return torch.get_num_threads()


# ----------------------------------------------------------------------------------------
# model sizes (HF config dicts)

# "small": CPU-sized stand-ins; "real": the released models' shapes, from blip2_jax.models.presets (one copy)
VISION = {
    # ViT 6 x 384 at 224 px / patch 14 (257 tokens): a CPU-sized stand-in for EVA ViT-g
    "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                  image_size=224, patch_size=14, qkv_bias=True, layer_norm_eps=1e-6),
    "real": presets.VISION["eva-vit-g"],  # EVA ViT-g/14 at 224 px (39 x 1408, 16 heads of 88)
}
QFORMER = {
    "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
                  encoder_hidden_size=384, cross_attention_frequency=2, vocab_size=30522),
    # BERT-base Q-Former, cross-attention every 2nd layer, vocab 30523 with [DEC]
    "real": dict(presets.QFORMER, encoder_hidden_size=presets.VISION["eva-vit-g"]["hidden_size"]),
}
REAL_TEXT = {("real", "opt"): "opt-2.7b", ("opt6.7b", "opt"): "opt-6.7b", ("real", "t5"): "flan-t5-xl"}


def text_config(size: str, family: str):
  """small: OPT 6 x 512 / T5 4+4 x 512 with the real vocabularies; real: OPT-2.7B / FlanT5-XL;
  opt6.7b: OPT-6.7B (the real ones from blip2_jax.models.presets)."""
  import transformers
  if (size, family) in REAL_TEXT:
    return presets.text_config(REAL_TEXT[size, family])
  if size != "small":
    raise ValueError(f"no {size!r} {family} size; known: small, " + ", ".join(f"{s} ({f})" for s, f in REAL_TEXT))
  if family == "opt":
    return transformers.OPTConfig(hidden_size=512, ffn_dim=2048, num_hidden_layers=6, num_attention_heads=8,
                                  vocab_size=50304, word_embed_proj_dim=512, max_position_embeddings=2048,
                                  pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0)
  return transformers.T5Config(d_model=512, d_ff=1024, d_kv=64, num_layers=4, num_heads=8, vocab_size=32128,
                               feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)


def blip2_config(size: str, family: str | None, num_query_tokens: int = 32):
  """A transformers Blip2Config of `size` (small | real | opt6.7b); family None: retrieval only."""
  import transformers
  tower = "real" if size in ("real", "opt6.7b") else "small"
  kw = dict(vision_config=dict(VISION[tower]), qformer_config=dict(QFORMER[tower]),
            num_query_tokens=num_query_tokens)
  kw["qformer_config"]["encoder_hidden_size"] = VISION[tower]["hidden_size"]
  if family is None:  # retrieval / stage 1: the Q-Former's text path (its own FFN)
    kw["qformer_config"]["use_qformer_text_input"] = True
  if family is not None:
    kw["text_config"] = text_config(size, family).to_dict()
  cfg = transformers.Blip2Config(**kw)
  # OPT: the <image> token BLIP-2 checkpoints add (50265 < vocab); T5: one of the spare ids
  cfg.image_token_index = 50265 if family in ("opt", None) else 32100
  return cfg
