"""Stage 2: generative pre-training, the Q-Former's outputs as a soft prompt to a frozen LLM.

    python -m blip2_jax.train --config configs/stage2.py:llm=opt2.7b --workdir W \
        --config.model.pretrained=stage1-hf-dir --config.model.language_model=opt-2.7b-dir ...
    python -m blip2_jax.train --config configs/stage2.py:llm=flant5xl,tiny --workdir /tmp/s2
    python -m blip2_jax.train --config configs/stage2.py:llm=Qwen/Qwen2.5-7B --workdir W \
        --config.model.pretrained=stage1-hf-dir ...      # any LLM of models/registry.py by dir / Hub id
    python -m blip2_jax.train --config configs/stage2.py:llm=gemma2,tiny --workdir /tmp/s2g

The ViT and Q-Former come from a stage-1 directory (`model.pretrained`, a HF
Blip2ForImageTextRetrieval layout as stage 1 exports it) and the LLM from its own directory;
the decoder-only LLMs a language-modelling loss on the caption (+ "\\n" for OPT, + the tokenizer's
EOS for LLaMA, Qwen2 / 3, Mistral, Gemma 2 / 3), FlanT5 a prefix-LM loss
(the caption split into an encoder prefix and a decoder suffix, `loss.t5_prefix_ratio`).
Paper: 80k steps, batch 1920 (OPT) / 1520 (FlanT5), peak lr 1e-4, min lr 5e-5, warmup 2000.
"""
from configs import common

LLMS = {"opt2.7b": ("opt", 1920), "opt6.7b": ("opt", 1920), "flant5xl": ("t5", 1520),
        "flant5xxl": ("t5", 1520), "vicuna7b": ("llama", 1920)}
# the released model of each LLM (blip2_jax.models.presets): its shapes for python -m blip2_jax.aot
PRESETS = {"opt2.7b": "blip2-opt-2.7b", "opt6.7b": "blip2-opt-6.7b", "flant5xl": "blip2-flan-t5-xl",
           "flant5xxl": "blip2-flan-t5-xxl", "vicuna7b": "blip2-vicuna-7b"}


def get_config(arg=None):
  a = common.parse_arg(arg, llm="opt2.7b", tiny=False)
  c = common.base("stage2")
  batch = common.pick_llm(c, a.llm, LLMS, PRESETS, batch=1920)
  c.model.init = "towers"  # vision + Q-Former from model.pretrained (stage 1), LLM from model.language_model
  c.total_steps = 80_000
  c.global_batch_size = batch
  # python -m blip2_jax.aot on a v5p-128 at the paper's batch (24-30 rows per chip): without remat the
  # step takes 19-55% of the HBM (OPT-2.7B .. FlanT5-XXL), and remat's recomputation costs 19% more
  # FLOPs (benchmarks/RESULTS.md, "TPU, compiled ahead of time"); chips with less memory per row may
  # need model.remat=full
  c.model.remat = "none"
  c.optim.update(lr=1e-4, min_lr=5e-5, warmup_steps=2000)
  if a.tiny:
    common.tiny(c, c.model.family)
  return c
