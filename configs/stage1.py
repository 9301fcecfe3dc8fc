"""Stage 1: Q-Former pre-training against a frozen ViT with ITC + ITM + ITG (paper section 3.2).

    python -m blip2_jax.train --config configs/stage1.py:vit=g --workdir W \
        --config.model.vision=blip2-vision-dir --config.model.qformer_bert=bert-base-uncased \
        --config.data.annotations=ann.json --config.data.images_dir=images/
    python -m blip2_jax.train --config configs/stage1.py:tiny --workdir /tmp/s1   # CPU, seconds

Paper: 250k steps, batch 2320 (ViT-L) / 1680 (ViT-g), AdamW (0.9, 0.98, wd 0.05), peak lr 1e-4 with
2000 warmup steps and cosine decay, 224 px, RandomResizedCrop(0.5, 1) + flip.
"""
from configs import common

BATCH = {"g": 1680, "l": 2320}
PRESET = {"g": "blip2-itm-vit-g", "l": "blip2-itm-vit-l"}  # shapes for python -m blip2_jax.aot


def get_config(arg=None):
  a = common.parse_arg(arg, vit="g", tiny=False)
  if a.vit not in BATCH:
    raise ValueError(f"vit={a.vit!r}: choose g (EVA ViT-g/14) or l (CLIP ViT-L/14)")
  c = common.base("stage1")
  c.model.architecture = "Blip2ForImageTextRetrieval"
  c.model.preset = PRESET[a.vit]
  c.frozen = [common.FROZEN_VIT]
  c.total_steps = 250_000
  c.global_batch_size = BATCH[a.vit]
  # python -m blip2_jax.aot on a v5p-128 at the paper's batch (26 rows per chip): without remat the
  # step takes 21% of the HBM, and remat's recomputation costs 12% more FLOPs (benchmarks/RESULTS.md,
  # "TPU, compiled ahead of time"); chips with less memory per row may need model.remat=full
  c.model.remat = "none"
  c.optim.update(lr=1e-4, min_lr=1e-5, warmup_steps=2000)
  if a.tiny:
    common.tiny(c, None)
  return c
