"""GPU checks of the core models (not a test; run on a GPU machine).

1. float32 parity on the GPU: tiny random HF checkpoints (OPT, T5, LLaMA, InstructBLIP,
   retrieval) vs transformers on the CPU, with JAX's float32 matmuls at "highest" precision.
2. Real-size shapes with random weights (EVA ViT-g/14 224 px + BERT-base Q-Former + OPT-2.7B),
   bf16 compute: the forward compiles and runs, XLA and cuDNN attention agree, and the time of a
   jitted forward at batch 8 for each attention implementation.

    python benchmarks/gpu_core_check.py [--batch 8] [--skip-parity]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def parity_on_gpu():
  import transformers

  from blip2_jax.checkpoints import tiny
  from blip2_jax.cli import parity
  transformers.utils.logging.disable_progress_bar()
  with jax.default_matmul_precision("highest"):
    for name, (arch, fam) in parity.TINY.items():
      d = tiny.save_tiny(tempfile.mkdtemp(), arch, fam)
      rows = parity.compare(d, batch=3)
      print(f"parity-gpu {name}: " + "  ".join(f"{n} {mx:.1e}" for n, mx, _, _ in rows), flush=True)


def real_size(batch: int):
  import transformers

  from blip2_jax.models import blip2
  text = transformers.OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                                num_attention_heads=32, vocab_size=50272, word_embed_proj_dim=2560)
  hf = transformers.Blip2Config(text_config=text.to_dict(), num_query_tokens=32)
  hf.image_token_index = 50265
  results = {}
  for impl in ("xla", "cudnn"):
    cfg = blip2.Blip2Config.from_hf(hf, architecture="Blip2ForConditionalGeneration", dtype="bfloat16",
                                    param_dtype="bfloat16", scan=True, attn_impl=impl)
    model = blip2.build(cfg)
    kw = blip2.dummy_inputs(cfg)
    t0 = time.time()
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), **kw)["params"])()
    params = jax.tree_util.tree_map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                                    is_leaf=lambda x: hasattr(x, "unbox"))
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"init {impl}: {n / 1e9:.2f}B params in {time.time() - t0:.1f}s", flush=True)
    rng = np.random.default_rng(0)
    px = jnp.asarray(rng.standard_normal((batch, 224, 224, 3)), jnp.float32)
    ids = jnp.asarray(rng.integers(3, 50000, (batch, 24)), jnp.int32)
    fwd = jax.jit(lambda p, x, i: model.apply({"params": p}, pixel_values=x, input_ids=i)["logits"])
    t0 = time.time()
    logits = fwd(params, px, ids).block_until_ready()
    compile_s = time.time() - t0
    times = []
    for _ in range(5):
      t0 = time.time()
      fwd(params, px, ids).block_until_ready()
      times.append(time.time() - t0)
    results[impl] = np.asarray(logits.astype(jnp.float32))
    print(f"forward {impl}: batch {batch}, compile+first {compile_s:.1f}s, "
          f"median {np.median(times) * 1e3:.1f} ms, finite {np.isfinite(results[impl]).all()}", flush=True)
    del params
  d = np.abs(results["xla"] - results["cudnn"])
  print(f"xla vs cudnn logits (bf16, max |logit| {np.abs(results['xla']).max():.2f}): "
        f"max abs diff {d.max():.3e}, mean {d.mean():.3e}", flush=True)


if __name__ == "__main__":
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--skip-parity", action="store_true")
  a = p.parse_args()
  print(jax.devices(), flush=True)
  if not a.skip_parity:
    parity_on_gpu()
  real_size(a.batch)
