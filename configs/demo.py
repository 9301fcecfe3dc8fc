"""The first-run demo's two stages (`python -m blip2_jax.demo` runs both and evaluates them).

    python -m blip2_jax.train --config configs/demo.py:stage=1 --workdir runs/demo/stage1 \
        --config.model.vision=VIT_DIR --config.model.qformer_bert=MINILM_DIR
    python -m blip2_jax.train --config configs/demo.py:stage=2 --workdir runs/demo/stage2 \
        --config.model.pretrained=runs/demo/stage1/hf --config.model.language_model=SMOLLM2_DIR

A CPU-sized BLIP-2 on generated scenes (data/synthetic.py, held-out colour-shape pairs):
  * scenes: the shapes gather in the corner of the quadrant their caption names, each with a dark
    outline. Position is then what a patch shows (which of its corners the shapes fill), not only
    which patch shows them: with shapes placed anywhere in the quadrant, a probe of the stage-1
    Q-Former's query outputs found position in 0.3% of their variance (count, colour, shape: 16-42%)
    and neither reader learned it (position 29% after stage 2, chance 25%). The outline is a shape
    cue no colour changes: without it held-out shapes stayed at chance (stage 1: 4%, stage 2: 29%).
    Shapes are 0.12 of the image in radius (synthetic.RADIUS, was 0.1), more fill per outline
    pixel for colour (one run each, after 300 / 350 stage-2 steps: held-out colours 48% -> 54%,
    which may be within the spread of runs).
  * ViT: 4 layers of width 256 on 64 px images, 32 px patches: 4 tokens, one per quadrant of the
    scene. Randomly initialised -- no real ViT ships on PyPI -- and frozen in both stages as BLIP-2
    freezes its image encoder: the random features of this ViT already hold every attribute, while a
    ViT trained in stage 1 learned to drop position (measured on the earlier scenes). Its 2-D
    sine-cosine position embeddings are scaled by POSITION_SCALE so that the random blocks keep
    where a patch is.
  * Q-Former: all-MiniLM-L6-v2 (6 layers, width 384) with 8 queries (the paper's 32 are for 257
    ViT-g tokens; 4 patches of a flat scene need fewer), cross-attention in every layer, whose fresh
    query / key projections start 4x larger than BERT's N(0, 0.02) (INIT_SCALES), so attention
    starts sharper than near-uniform. Both were chosen on the earlier scenes (a probe of the
    untrained Q-Former read position at 100% with them, 86% without) and kept, not re-measured;
  * stage 2: ViT frozen, SmolLM2-135M-Instruct frozen (LLaMA), Q-Former + projection trained, with
    the prompt "a photo of" (LAVIS's caption prompt): SmolLM2's tokenizer adds no BOS, so without a
    prompt the caption's first word would have to come from the last query alone, which 100 steps
    do not teach (measured: every caption then began with "-"). The new, random projection learns at
    10x the lr (corner scenes without the outline, one run each: at 4x caption exact match was 4%
    after 100 steps and 31% after 200; at 10x, 29% after 125 and 65% after 250).
Everything computes in float32: XLA:CPU has no fast bfloat16 matmuls.
"""
from configs import common

PROMPT = "a photo of"
# stage-1 learning-rate multipliers for the Q-Former's parts that BERT lacks (cross-attention, queries,
# ITC / ITM / ITG heads): they start from random weights next to MiniLM's pretrained ones
NEW_PARTS_LR_SCALES = ((r".*crossattention.*", 5.0), (r".*query_tokens.*", 5.0),
                       (r".*(vision_proj|text_proj|itm_head).*", 5.0), (r"qformer_lm_head/.*", 5.0))
INIT_SCALES = ((r"qformer/.*crossattention/attention/(query|key)/kernel", 4.0),)
VISION = dict(image_size=64, patch_size=32, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
              intermediate_size=1024)
POSITION_SCALE = 3.0  # x the unit sine-cosine table (cli/demo.vision_dir)


def get_config(arg=None):
  a = common.parse_arg(arg, stage=1, steps=0, batch=16)
  if a.stage not in (1, 2):
    raise ValueError(f"stage={a.stage}: choose 1 or 2")
  c = common.base("stage1" if a.stage == 1 else "stage2")
  c.model.dtype = c.model.frozen_dtype = "float32"
  c.model.remat = "none"
  c.model.image_size = VISION["image_size"]
  c.model.num_query_tokens = 8
  c.model.dropout = False  # a few hundred steps: dropout only slows learning down
  c.data.source = "shapes"
  c.data.num_records = 4096
  c.data.augment = False   # a flip turns "at the top left" into a wrong caption, a crop can drop a shape
  c.data.max_txt_len = 9  # the longest scene caption in BERT tokens, [CLS] and [SEP] included
  c.global_batch_size = a.batch
  c.eval_every = -1        # the demo evaluates before and after each stage itself
  c.log_every = 20
  c.checkpoint_every = 100
  c.keep_checkpoints = 1
  if a.stage == 1:
    c.model.architecture = "Blip2ForImageTextRetrieval"
    c.frozen = [common.FROZEN_VIT]
    c.model.cross_attention_frequency = 1
    c.model.init_scales = INIT_SCALES
    c.total_steps = a.steps or 200
    # 3x LAVIS's 1e-4 for MiniLM's pretrained weights (1e-3 keeps ITC at chance for 60+ steps); the
    # parts BERT does not have start from random weights and learn at 5x that (NEW_PARTS_LR_SCALES)
    c.optim.update(lr=3e-4, min_lr=3e-5, warmup_steps=20, warmup_init=1e-5)
    c.optim.lr_scales = NEW_PARTS_LR_SCALES
  else:
    c.model.family = "llama"
    c.frozen = [common.FROZEN_VIT, common.FROZEN_LLM]
    c.loss.prompt = PROMPT
    # SmolLM2 rows: "a photo of" + the longest caption + EOS are 11 tokens; a narrower row cuts the EOS
    # and the LLM never learns to stop (the demo computes the width for any tokenizer: stage2_text_len)
    c.data.max_txt_len = 11
    c.total_steps = a.steps or 350
    c.optim.update(lr=5e-4, min_lr=5e-5, warmup_steps=10, warmup_init=1e-5)
    c.optim.lr_scales = ((r"model/language_projection/.*", 10.0),)  # new and random (docstring)
  return c
