"""Caption fine-tuning (COCO) of a BLIP-2 with an LLM: ViT unfrozen, 364 px, prompt "a photo of".

    python -m blip2_jax.train --config configs/caption_ft.py:llm=opt2.7b --workdir W \
        --config.model.pretrained=blip2-opt-2.7b --config.data.annotations=coco_karpathy_train.json ...

LAVIS caption_coco_ft: 5 epochs, batch 256, lr 1e-5 (warmup 1000 from 1e-8, cosine to 0),
wd 0.05, image 364 (position embeddings interpolated), ViT trained, LLM frozen.
"""
from configs import common
from configs.stage2 import LLMS, PRESETS


def get_config(arg=None):
  a = common.parse_arg(arg, llm="opt2.7b", res=364, tiny=False)
  if a.llm not in LLMS:
    raise ValueError(f"llm={a.llm!r}: choose one of {sorted(LLMS)}")
  c = common.base("caption")
  c.model.family = LLMS[a.llm][0]
  c.model.preset = PRESETS[a.llm]
  c.model.init = "pretrained"
  c.model.image_size = a.res
  c.frozen = [common.FROZEN_LLM]
  c.num_epochs = 5
  c.global_batch_size = 256
  c.loss.prompt = "a photo of"
  c.optim.update(lr=1e-5, min_lr=0.0, warmup_steps=1000, warmup_init=1e-8)
  if a.tiny:
    common.tiny(c, c.model.family)
    c.model.init = "random"
  return c
