"""VQA fine-tuning (VQAv2-style) of a BLIP-2 with an LLM: a prefix LM on the answer, ViT trained, LLM frozen.

    python -m blip2_jax.train --config configs/vqa_ft.py:llm=flant5xl --workdir W \
        --config.model.pretrained=blip2-flan-t5-xl --config.data.annotations=vqa_train.jsonl \
        --config.data.images_dir=coco/images --config.data.eval_annotations=vqa_val.jsonl
    python -m blip2_jax.finetune --task vqa ...   # the same recipe from the fine-tuning CLI

Data: JSONL {"image", "question", "answers": [...]}; each step draws one answer per question by its
annotator frequency (`train.tasks.vqa_fields`). The LLM reads "Question: {q} Answer:" ("Question: {q}
Short answer:" for FlanT5; `loss.vqa_prompt` overrides, one "{}") and the loss is on the answer only.
An InstructBLIP checkpoint also reads that prompt in its Q-Former (the paper's "question also given to
the Q-Former"); a BLIP-2 Q-Former has no text input in HF's Blip2ForConditionalGeneration, so there
the question reaches the LLM only (as LAVIS's BLIP-2 VQA).

BLIP-2 paper, VQAv2 fine-tuning (ViT-g): 5 epochs, batch 128, lr 1e-5 with 1000 warmup steps, AdamW
(0.9, 0.999), weight decay 0.05, image 490 (position embeddings interpolated), layer-wise lr decay 0.95
for the ViT (`optim.layer_decay`, applied per block: see train/optim.vit_layer_scales), LLM frozen,
5 beams at inference.
"""
from configs import common
from configs.stage2 import LLMS, PRESETS


def get_config(arg=None):
  a = common.parse_arg(arg, llm="flant5xl", res=490)
  if a.llm not in LLMS:
    raise ValueError(f"llm={a.llm!r}: choose one of {sorted(LLMS)}")
  c = common.base("vqa")
  c.model.family = LLMS[a.llm][0]
  c.model.preset = PRESETS[a.llm]
  c.model.init = "pretrained"
  c.model.image_size = a.res
  c.frozen = [common.FROZEN_LLM]
  c.num_epochs = 5
  c.global_batch_size = 128
  c.optim.update(lr=1e-5, min_lr=0.0, warmup_steps=1000, warmup_init=1e-8, b2=0.999, layer_decay=0.95)
  c.loss.vqa_prompt = ""  # "": the family's default; else a template with one {}
  c.eval.update(num_beams=5, max_new_tokens=10)
  c.best_metric = "eval/vqa_acc"
  return c
