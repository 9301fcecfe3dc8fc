"""Image-text retrieval speed: `blip2_jax.inference.retrieval_scores` against HF PyTorch on the
same random Blip2ForImageTextRetrieval.

  PYTHONPATH=. python benchmarks/retrieval.py                                  # CPU, small
  PYTHONPATH=. python benchmarks/retrieval.py --size real --images 1000 --texts 5000 --k 128 --batch 128  # GPU

The task is LAVIS's evaluation (COCO 1k test images x 5k captions): ITC similarities for every
pair (max over the 32 queries of the cosine of the normalised projections), then each image's
top-k texts and each text's top-k images re-scored with the ITM head (ITM logit 1 + ITC), so
images * k + texts * k ITM passes of the Q-Former.
Ours: `retrieval_scores(model, params, px, ids, mask, k=..., batch_size=...)` (jitted image / text /
ITM functions, fixed batch shapes, numpy top-k). PyTorch: the same pipeline on the HF model's own
modules -- the two halves of `Blip2ForImageTextRetrieval.forward`: the ITC branch
(`use_image_text_matching_head=False`: ViT -> Q-Former queries -> vision_projection; text Q-Former
-> text_projection) run once per image / text batch, and the ITM branch
(`use_image_text_matching_head=True`: queries + text through the Q-Former with cross-attention,
itm_head averaged over the queries) run on the cached ViT outputs, as LAVIS does (calling
`forward(use_image_text_matching_head=True)` per pair would rerun the ViT for every pair);
torch.topk for the candidates, under `inference_mode`, same batch size.
Both produce the same scores (max abs diff printed). Times: median of `--repeats` full runs,
ours and torch in turn, after one warm-up run each (ours compiles there).
--size small: ViT 6 x 384 at 224 px, Q-Former 4 x 384 (see common.py); the CPU default is
scaled down to 32 images x 160 texts, k 4 (an ITM pass costs about as much as 1/5 of a ViT
forward here, so LAVIS's 1k x 5k with k 128 is 768k Q-Former passes: hours on a CPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def torch_retrieval(hf, px, ids, mask, k: int, batch_size: int):
  """LAVIS-style retrieval with the HF model's modules -> {"itc", "i2t", "t2i"} numpy."""
  import torch
  import torch.nn.functional as F
  dev = px.device
  n_img, n_txt = px.shape[0], ids.shape[0]
  img_emb, img_feat, txt_feat = [], [], []
  with torch.inference_mode():
    for s in range(0, n_img, batch_size):
      e = hf.vision_model(pixel_values=px[s:s + batch_size]).last_hidden_state
      q = hf.query_tokens.expand(e.shape[0], -1, -1)
      qo = hf.qformer(query_embeds=q, encoder_hidden_states=e).last_hidden_state
      img_emb.append(e)
      img_feat.append(F.normalize(hf.vision_projection(qo), dim=-1))
    for s in range(0, n_txt, batch_size):
      to = hf.qformer(query_embeds=hf.embeddings(input_ids=ids[s:s + batch_size]), query_length=0,
                      attention_mask=mask[s:s + batch_size]).last_hidden_state
      txt_feat.append(F.normalize(hf.text_projection(to[:, 0]), dim=-1))
    img_emb, img_feat, txt_feat = torch.cat(img_emb), torch.cat(img_feat), torch.cat(txt_feat)
    itc = torch.einsum("iqe,te->iqt", img_feat, txt_feat).max(dim=1)[0]
    nq = hf.query_tokens.shape[1]

    def itm(ii, tt):
      out = []
      for s in range(0, ii.shape[0], batch_size):
        i, t = ii[s:s + batch_size], tt[s:s + batch_size]
        q = hf.query_tokens.expand(i.shape[0], -1, -1)
        am = torch.cat([torch.ones(i.shape[0], nq, dtype=mask.dtype, device=dev), mask[t]], 1)
        h = hf.qformer(query_embeds=hf.embeddings(input_ids=ids[t], query_embeds=q), query_length=nq,
                       attention_mask=am, encoder_hidden_states=img_emb[i]).last_hidden_state[:, :nq]
        out.append(hf.itm_head(h).mean(dim=1)[:, 1].float())
      return torch.cat(out)

    i2t = torch.full((n_img, n_txt), -100.0, device=dev)
    top_t = itc.topk(min(k, n_txt), dim=1).indices
    ii = torch.arange(n_img, device=dev).repeat_interleave(top_t.shape[1])
    tt = top_t.reshape(-1)
    i2t[ii, tt] = itm(ii, tt) + itc[ii, tt]
    t2i = torch.full((n_txt, n_img), -100.0, device=dev)
    top_i = itc.T.topk(min(k, n_img), dim=1).indices
    tt = torch.arange(n_txt, device=dev).repeat_interleave(top_i.shape[1])
    ii = top_i.reshape(-1)
    t2i[tt, ii] = itm(ii, tt) + itc[ii, tt]
  return {"itc": itc.float().cpu().numpy(), "i2t": i2t.cpu().numpy(), "t2i": t2i.cpu().numpy()}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", choices=("small", "real"), default="small")
  ap.add_argument("--images", type=int, default=32)
  ap.add_argument("--texts", type=int, default=160)
  ap.add_argument("--k", type=int, default=4)
  ap.add_argument("--text-len", type=int, default=24)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--torch-attn", default="sdpa")
  ap.add_argument("--threads", type=int, default=None)
  args = ap.parse_args()

  import jax.numpy as jnp
  import torch
  import transformers

  import blip2_jax
  from blip2_jax import inference
  threads = common.set_torch_threads(args.threads)
  print(common.machine_line(threads), flush=True)
  cfg = common.blip2_config(args.size, None)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
  torch.manual_seed(0)
  tmp = tempfile.TemporaryDirectory()
  transformers.Blip2ForImageTextRetrieval(cfg).save_pretrained(tmp.name)
  model, params = blip2_jax.from_pretrained(tmp.name, dtype=getattr(jnp, args.dtype))
  hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp.name, attn_implementation=args.torch_attn,
                                                               dtype=tdtype).to(dev).eval()
  rng = np.random.default_rng(0)
  s = cfg.vision_config.image_size
  px = rng.standard_normal((args.images, s, s, 3)).astype(np.float32)
  lens = rng.integers(args.text_len // 2, args.text_len + 1, size=args.texts)
  mask = (np.arange(args.text_len)[None] < lens[:, None]).astype(np.int32)
  ids = np.where(mask > 0, rng.integers(1000, 30000, (args.texts, args.text_len)), 0).astype(np.int32)
  ids[:, 0] = 101
  t_px = torch.from_numpy(px).permute(0, 3, 1, 2).contiguous().to(dev, tdtype)
  t_ids, t_mask = torch.from_numpy(ids).long().to(dev), torch.from_numpy(mask).long().to(dev)
  n_itm = args.images * min(args.k, args.texts) + args.texts * min(args.k, args.images)
  print(f"{args.size}: {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M parameters, {args.dtype}; "
        f"{args.images} images x {args.texts} texts ({args.text_len} tokens), k {args.k}: {n_itm} ITM pairs, "
        f"batch {args.batch}", flush=True)

  def ours():
    return inference.retrieval_scores(model, params, px, ids, mask, k=args.k, batch_size=args.batch)

  def theirs():
    out = torch_retrieval(hf, t_px, t_ids, t_mask, args.k, args.batch)
    common.torch_sync()
    return out

  t0 = time.perf_counter()
  a = ours()
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  b = theirs()
  tfirst = time.perf_counter() - t0
  diff = {key: float(np.max(np.abs(a[key] - b[key]))) for key in ("itc", "i2t", "t2i")}
  same_top = float(np.mean(a["i2t"].argmax(1) == b["i2t"].argmax(1)))
  print(f"first run (ours compiles) ours {first:.1f}s torch {tfirst:.1f}s; max abs diff {diff}; "
        f"top-1 i2t agreement {same_top * 100:.0f}%", flush=True)
  times = common.interleaved({"ours": ours, "torch": theirs}, args.repeats)
  o, t = common.med(times["ours"]), common.med(times["torch"])
  print(f"ours {o:.3f}s (of {common.fmt_times(times['ours'])}), {args.images / o:.1f} images/s | torch {t:.3f}s "
        f"(of {common.fmt_times(times['torch'])}), {args.images / t:.1f} images/s | ratio ours/torch (speed) "
        f"{t / o:.2f} | load average {common.loadavg()}", flush=True)
  tmp.cleanup()


if __name__ == "__main__":
  main()
