"""Retrieval fine-tuning (COCO) of a stage-1 model with ITC + ITM + ITG, ViT unfrozen, 364 px.

LAVIS ret_coco_ft: 5 epochs, batch 224, lr 1e-5, wd 0.05, image 364, k_test 128.
"""
from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, res=364, tiny=False)
  c = common.base("retrieval")
  c.model.architecture = "Blip2ForImageTextRetrieval"
  c.model.init = "pretrained"  # a stage-1 directory with qformer_lm_head.safetensors
  c.model.preset = "blip2-itm-vit-g"
  c.model.image_size = a.res
  c.frozen = []
  c.num_epochs = 5
  c.global_batch_size = 224
  c.optim.update(lr=1e-5, min_lr=0.0, warmup_steps=1000, warmup_init=1e-8)
  if a.tiny:
    common.tiny(c, None)
  return c
