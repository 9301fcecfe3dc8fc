"""InstructBLIP instruction tuning: the instruction enters the Q-Former and the frozen LLM; the
loss is on the response only. Data: JSONL {"image", "instruction", "response"}.

InstructBLIP paper: 60k steps max, batch 192 (FlanT5-XL) / 128 (FlanT5-XXL, Vicuna), lr 1e-5 with
1000 warmup steps, AdamW (0.9, 0.999, wd 0.05), ViT and LLM frozen, max text length 128 / output 256.
"""
from configs import common

LLMS = {"flant5xl": ("t5", 192), "flant5xxl": ("t5", 128), "vicuna7b": ("llama", 128), "vicuna13b": ("llama", 128)}
# the released model of each LLM (blip2_jax.models.presets): its shapes for python -m blip2_jax.aot
PRESETS = {"flant5xl": "instructblip-flan-t5-xl", "flant5xxl": "instructblip-flan-t5-xxl",
           "vicuna7b": "instructblip-vicuna-7b", "vicuna13b": "instructblip-vicuna-13b"}


def get_config(arg=None):
  a = common.parse_arg(arg, llm="vicuna7b", tiny=False)
  c = common.base("instruct")
  batch = common.pick_llm(c, a.llm, LLMS, PRESETS, batch=128)
  c.model.architecture = "InstructBlipForConditionalGeneration"
  c.model.init = "pretrained"
  c.total_steps = 60_000
  c.global_batch_size = batch
  # python -m blip2_jax.aot on a v5p-128 (2 rows per chip): remat's recomputation costs 34% more FLOPs
  # and its memory is not needed (benchmarks/RESULTS.md, "TPU, compiled ahead of time")
  c.model.remat = "none"
  c.data.max_txt_len = 128
  c.optim.update(lr=1e-5, min_lr=0.0, warmup_steps=1000, b2=0.999)
  if a.tiny:
    common.tiny(c, c.model.family)
  return c
