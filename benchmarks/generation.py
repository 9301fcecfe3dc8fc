"""Captioning speed: blip2_jax.generate against HF PyTorch `generate`, same random-weight model.

  PYTHONPATH=. python benchmarks/generation.py --size small --batch 1 16 --beams 1 5 --markdown

Builds a transformers `Blip2ForConditionalGeneration` from a `Blip2Config` with random weights,
saves it to a temporary directory and loads it with `blip2_jax.from_pretrained`; then for every
(batch, beams) times both `generate`s on the same inputs: 32 image tokens + a 4-token prompt
("</s>a photo of" for OPT), exactly `--new-tokens` new tokens (min_new_tokens = max_new_tokens,
so EOS is banned and neither side can stop early). Reported: generated tokens/s = batch * N /
seconds (beam search counts output tokens, not beam tokens), the median of `--repeats` runs after
one warm-up run (ours: the first call compiles; its time is reported separately), the ratio
ours / HF, and, for float32 greedy, whether the two outputs agree token for token.

--size small: a scaled-down config for CPUs (ViT 6 x 256, Q-Former 4 x 256, OPT 6 x 512 or
T5 4+4 x 512, real vocabularies). --size real: ViT-g/14 at 224 px (39 x 1408) + BERT-base Q-Former
+ OPT-2.7B (32 x 2560, vocab 50304) or FlanT5-XL (24+24 x 2048, vocab 32128): for a GPU, where the
random model is built on the GPU and saved in --dtype. `--json PATH` writes the rows.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

N_QUERY = 32


def blip2_config(size: str, family: str):
  import transformers
  if size == "real":
    vision = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                  image_size=224, patch_size=14, qkv_bias=True, layer_norm_eps=1e-6)
    qformer = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   encoder_hidden_size=1408, cross_attention_frequency=2, vocab_size=30522)
    if family == "opt":
      text = transformers.OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                                    num_attention_heads=32, vocab_size=50304, word_embed_proj_dim=2560,
                                    max_position_embeddings=2048, pad_token_id=1, bos_token_id=2,
                                    eos_token_id=2)
    else:
      text = transformers.T5Config(d_model=2048, d_ff=5120, d_kv=64, num_layers=24, num_heads=32,
                                   vocab_size=32128, feed_forward_proj="gated-gelu",
                                   tie_word_embeddings=False, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)
  else:
    vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                  image_size=224, patch_size=14, qkv_bias=True, layer_norm_eps=1e-6)
    qformer = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                   encoder_hidden_size=256, cross_attention_frequency=2, vocab_size=30522)
    if family == "opt":
      text = transformers.OPTConfig(hidden_size=512, ffn_dim=2048, num_hidden_layers=6,
                                    num_attention_heads=8, vocab_size=50304, word_embed_proj_dim=512,
                                    max_position_embeddings=2048, pad_token_id=1, bos_token_id=2,
                                    eos_token_id=2)
    else:
      text = transformers.T5Config(d_model=512, d_ff=1024, d_kv=64, num_layers=4, num_heads=8,
                                   vocab_size=32128, feed_forward_proj="gated-gelu",
                                   tie_word_embeddings=False, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)
  cfg = transformers.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                                 num_query_tokens=N_QUERY)
  # OPT: the <image> token BLIP-2 checkpoints add (50265 < 50304); T5: one of the spare ids.
  cfg.image_token_index = 50265 if family == "opt" else 32100
  return cfg


def prompt_ids(family: str) -> list[int]:
  # "a photo of" as the OPT tokenizer gives it (BOS prepended); T5: the same length, EOS appended.
  return [2, 102, 1345, 9] if family == "opt" else [3, 1202, 13, 1]


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), ts


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", choices=("small", "real"), default="small")
  ap.add_argument("--family", choices=("opt", "t5"), default="opt")
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
  ap.add_argument("--beams", type=int, nargs="+", default=[1, 5])
  ap.add_argument("--new-tokens", type=int, default=30)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--attn", nargs="+", default=["eager", "sdpa"], help="HF attention implementations")
  ap.add_argument("--scan", action="store_true", help="load ours with scanned layers")
  ap.add_argument("--skip-hf", action="store_true", help="time ours only")
  ap.add_argument("--markdown", action="store_true")
  ap.add_argument("--json", default=None, help="also write the rows as JSON here")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import torch
  import transformers

  import blip2_jax

  ncpu = os.cpu_count()
  torch.set_num_threads(ncpu)
  tdev = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  jdev = jax.devices()[0]
  print(f"jax {jax.__version__} on {jdev.platform} ({jdev.device_kind}), torch {torch.__version__} on {tdev} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"{ncpu} CPUs ({platform.processor() or platform.machine()}), python {platform.python_version()}, "
        f"load average {common.loadavg()}")

  cfg = blip2_config(args.size, args.family)
  torch.manual_seed(0)
  t0 = time.perf_counter()
  with torch.device(tdev if args.size == "real" else "cpu"):
    hf = transformers.Blip2ForConditionalGeneration(cfg).eval().to(tdtype)
  n_params = sum(p.numel() for p in hf.parameters())
  tmp = tempfile.TemporaryDirectory()
  hf.save_pretrained(tmp.name)
  del hf
  model, params = blip2_jax.from_pretrained(tmp.name, dtype=getattr(jnp, args.dtype), scan=args.scan)
  print(f"{args.size} {args.family} model: {n_params / 1e6:.1f}M parameters, {args.dtype}; "
        f"built, saved and loaded in {time.perf_counter() - t0:.1f}s")
  hf_models = {}
  for impl in ([] if args.skip_hf else args.attn):
    try:
      hf_models[impl] = transformers.Blip2ForConditionalGeneration.from_pretrained(
          tmp.name, attn_implementation=impl, dtype=tdtype).to(tdev).eval()
    except Exception as e:  # noqa: BLE001 - an implementation this install lacks
      print(f"HF attn_implementation={impl!r} unavailable: {type(e).__name__}: {e}")

  n = args.new_tokens
  prompt = prompt_ids(args.family)
  text = cfg.text_config
  gen_kw = dict(max_new_tokens=n, min_new_tokens=n, eos_token_id=text.eos_token_id,
                pad_token_id=text.pad_token_id, do_sample=False)
  rows = []
  for b in args.batch:
    rng = np.random.default_rng(b)
    px = rng.standard_normal((b, 224, 224, 3)).astype(np.float32)
    ids = np.tile(np.asarray(prompt, np.int32), (b, 1))
    for k in args.beams:
      row = dict(batch=b, beams=k)
      # ours: first call compiles; then the median of the timed runs
      run = lambda: jax.block_until_ready(blip2_jax.generate(model, params, px, ids, np.ones_like(ids),
                                                             num_beams=k, **gen_kw))
      t0 = time.perf_counter()
      ours_out = np.asarray(run())
      row["first"] = time.perf_counter() - t0
      # HF: [<image> * 32; prompt], one warm-up run each; then ours and HF timed in turn (so
      # load from other processes hits both), medians of --repeats
      t_px = torch.from_numpy(px).permute(0, 3, 1, 2).contiguous().to(tdev, tdtype)
      t_ids = torch.tensor([[cfg.image_token_index] * N_QUERY + prompt] * b, dtype=torch.long, device=tdev)

      def hf_run(hfm):
        with torch.inference_mode():
          out = hfm.generate(pixel_values=t_px, input_ids=t_ids, attention_mask=torch.ones_like(t_ids),
                             num_beams=k, **gen_kw)
        if tdev == "cuda":
          torch.cuda.synchronize()
        return out

      runs = {"ours": run}
      for impl, hfm in hf_models.items():
        ref = hf_run(hfm).cpu().numpy()
        ref = ref[:, t_ids.shape[1]:] if cfg.use_decoder_only_language_model else ref[:, 1:]
        assert ref.shape == (b, n), ref.shape
        if args.dtype == "float32":
          row[f"agree_{impl}"] = float(np.mean(ours_out == ref))
          row[f"same_{impl}"] = bool((ours_out == ref).all())
        runs[f"hf_{impl}"] = lambda hfm=hfm: hf_run(hfm)
      times = {name: [] for name in runs}
      for _ in range(args.repeats):
        for name, fn in runs.items():
          times[name].append(median_time(fn, 1)[0])
      for name, ts in times.items():
        row[f"{name}_s"], row[f"{name}_all"] = statistics.median(ts), ts
        row[name] = b * n / row[f"{name}_s"]
      rows.append(row)
      msg = (f"batch {b:3d} beams {k}: ours {row['ours']:8.1f} tok/s (median {row['ours_s']:.3f}s of "
             f"{[round(t, 3) for t in row['ours_all']]}; first call {row['first']:.1f}s)")
      for impl in hf_models:
        msg += (f" | HF {impl} {row[f'hf_{impl}']:8.1f} tok/s (median {row[f'hf_{impl}_s']:.3f}s of "
                f"{[round(t, 3) for t in row[f'hf_{impl}_all']]}) ratio {row['ours'] / row[f'hf_{impl}']:.2f}")
        if f"same_{impl}" in row:
          msg += f" tokens equal: {row[f'same_{impl}']} ({row[f'agree_{impl}'] * 100:.0f}%)"
      print(msg + f" | load average {common.loadavg()}", flush=True)
      if args.json:
        import json
        with open(args.json, "w") as f:
          json.dump(dict(size=args.size, family=args.family, dtype=args.dtype, new_tokens=n, device=jdev.device_kind,
                         platform=jdev.platform, torch_device=tdev, attn=list(hf_models), rows=rows), f, indent=1,
                    default=float)

  if args.markdown:
    impls = list(hf_models)
    head = ["batch", "beams", "ours tok/s"] + [f"HF {i} tok/s" for i in impls] + \
        [f"ours / HF {i}" for i in impls] + ["ours first call (compile + run) s"]
    if args.dtype == "float32" and impls:
      head.append("tokens equal (fp32)")
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for r in rows:
      cells = [str(r["batch"]), str(r["beams"]), f"{r['ours']:.1f}"]
      cells += [f"{r[f'hf_{i}']:.1f}" for i in impls]
      cells += [f"{r['ours'] / r[f'hf_{i}']:.2f}" for i in impls]
      cells.append(f"{r['first']:.1f}")
      if args.dtype == "float32" and impls:
        cells.append(", ".join(f"{i}: {r[f'agree_{i}'] * 100:.0f}%" for i in impls))
      print("| " + " | ".join(cells) + " |")
  tmp.cleanup()


if __name__ == "__main__":
  main()
