r"""Fine-tune a BLIP-2 / InstructBLIP checkpoint on your own images: captions, VQA or instructions.

    python -m blip2_jax.finetune --model Salesforce/blip2-opt-2.7b --task caption --train train.jsonl \
        --val val.jsonl --images-dir images/ --workdir runs/caps [--set optim.lr=2e-5 --set global_batch_size=64 ...]

Data: JSONL, one record a line, image paths relative to --images-dir:
  caption   {"image": "rel/path.jpg", "caption": "a dog on a sofa"}       (a list of captions also works)
  vqa       {"image": "rel/path.jpg", "question": "what color is the sofa?", "answers": ["red", "red", "maroon"]}
  instruct  {"image": "rel/path.jpg", "instruction": "Describe the dog.", "response": "a small brown dog"}
Both files are checked before anything is loaded or compiled (image files missing or not images, image
paths leading outside --images-dir (absolute or up with ..; --allow-outside-images-dir reads them), text
fields empty or of the wrong type, captions empty after LAVIS's cleaning ("...", a zero-width space),
unknown keys, records of the wrong kind, a byte that is not UTF-8: "FILE:LINE:COLUMN"); a bad file stops
the run with a report naming every bad line ("FILE:N", N the file line from 1; a JSON list: "FILE:
record N", from 1).
Optional keys: image_id, question_id, id, instance_id, dataset. --train may also be a CapFilt output
directory (data/capfilt_shards.py; --task caption or instruct): its complete shards, each image with
its kept captions, one drawn per step.

Bad input exits with status 2 and one line on stderr (the data report: that line, then one per problem)
before anything is loaded or created: a --model directory that is missing, empty, not a BLIP-2 /
InstructBLIP checkpoint with a language model, without weights or tokenizer, or with a truncated
model.safetensors; an annotation problem; a --set key that does not exist, comes from the checkpoint
(model.num_query_tokens, ...) or holds a value training would fail on (global_batch_size=0,
num_epochs=0, model.dtype=float8, ...); a --workdir that is a file or cannot be written. A failure
during training exits with status 1 (`--debug` shows the traceback); a --workdir this run created and
left without a file is removed.

Start: --model is a HF directory (`save_pretrained` of blip2_jax or of transformers
Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration) holding the LLM tokenizer
(InstructBLIP: the Q-Former's BERT tokenizer in DIR/qformer_tokenizer, as InstructBlipProcessor saves it),
or a Hugging Face Hub id (Salesforce/blip2-opt-2.7b, --revision for a branch, tag or commit) resolved
through the Hugging Face cache.

Recipes (every field overridable with --set; --print-config shows the result):
  caption   configs/caption_ft.py (LAVIS caption_coco_ft): lr 1e-5, 5 epochs, batch 256, 364 px, ViT and
            Q-Former trained, LLM frozen, prompt "a photo of"; metric CIDEr (5 beams, <= 30 new tokens).
  vqa       configs/vqa_ft.py (BLIP-2 paper, VQAv2): lr 1e-5, 5 epochs, batch 128, 490 px, ViT layer-wise
            lr decay 0.95, LLM frozen; prefix LM "Question: {} Answer:" ("Question: {} Short answer:" for
            FlanT5) with the loss on the answer, one answer per question drawn by annotator frequency;
            metric VQAv2 accuracy (5 beams, <= 10 new tokens).
  instruct  configs/instruct.py (InstructBLIP): lr 1e-5, 5 epochs, batch 192 (FlanT5) / 128, the
            checkpoint's image size, ViT and LLM frozen (Q-Former and projection train), text up to 128
            tokens; loss on the response; metric exact match (5 beams, <= 64 new tokens).
  Warmup is the recipe's 1000 steps, at most a tenth of the run. Images above the checkpoint's size
  interpolate its position embeddings (bicubic, as LAVIS).

Question / instruction in the Q-Former: an InstructBLIP checkpoint reads the prompt ("Question: ...
Answer:" or the instruction) in its Q-Former as well as in the LLM (InstructBLIP; the BLIP-2 paper's
VQA fine-tuning). A BLIP-2 checkpoint's Q-Former has no text input (HF Blip2ForConditionalGeneration),
so there the prompt reaches the LLM only, as in LAVIS's BLIP-2 VQA; --task instruct on a BLIP-2
checkpoint is allowed and trains the same way. Retrieval / stage-1 checkpoints (no LLM) are refused.

Evaluation on --val before training and at the end of every epoch; each one that beats the best so far
is exported to WORKDIR/best (HF layout + tokenizers + best.json, loadable by transformers and
blip2_jax); WORKDIR/hf is the model after the last epoch; WORKDIR/checkpoints holds the latest
train states (rerun the same command to resume after a crash or preemption); metrics go to
WORKDIR/metrics.jsonl and WORKDIR/tb.

Hardware: the same command runs on one CPU, one GPU, or every host of a TPU pod / GPU cluster (add
--distributed, or let SLURM / TPU environment variables start it); the mesh is `--set mesh=D,F,T`
(data, fsdp, tensor; one -1 takes the remaining devices; default -1,1,1 = data parallel). Multi-process
runs skip the in-training evaluation (so WORKDIR/best is not written): evaluate WORKDIR/hf with
`python -m blip2_jax.evaluate` afterwards.
"""
from __future__ import annotations

import argparse
import os
import sys

from blip2_jax.cli import options
from blip2_jax.cli.options import GENERATION_ARCHS, UsageError
from blip2_jax.core import sharding
from blip2_jax.data import annotations, capfilt_shards, processing, sources
from blip2_jax.train import loop, recipe_module, run_config, tasks, validate

TASKS = ("caption", "vqa", "instruct")
# record kinds (data.annotations.TEXT_SCHEMAS) each task trains / evaluates on
TRAIN_KINDS = {"caption": ("caption",), "vqa": ("vqa",), "instruct": ("instruction", "caption")}
VAL_KINDS = {"caption": ("caption",), "vqa": ("vqa",), "instruct": ("instruction",)}
NO_LLM_ARCHS = ("Blip2ForImageTextRetrieval", "Blip2VisionModelWithProjection", "Blip2TextModelWithProjection")
EVAL = {"caption": dict(num_beams=5, max_new_tokens=30), "vqa": dict(num_beams=5, max_new_tokens=10),
        "instruct": dict(num_beams=5, max_new_tokens=64)}


# ----------------------------------------------------------------------------------------
# checkpoint


def inspect_checkpoint(path: str) -> dict:
  """{architecture, family, instruct, image_size, patch_size, num_query_tokens, cross_attention_frequency,
  qformer_tokenizer} of a HF BLIP-2 directory, from its config.json and file list alone (nothing is
  loaded); UsageError for a directory that cannot be fine-tuned."""
  cfg = options.read_checkpoint_config(path)
  archs = cfg.get("architectures") or []
  if not cfg.get("text_config") or any(a in NO_LLM_ARCHS for a in archs):
    raise UsageError(f"--model {path}: {', '.join(archs) or cfg.get('model_type')} has no language model; "
                     "fine-tuning for captions, VQA or instructions needs Blip2ForConditionalGeneration or "
                     "InstructBlipForConditionalGeneration")
  options.check_weights(path)
  options.check_tokenizer(path)
  try:
    family = processing.family_of(cfg)
  except ValueError as e:
    raise UsageError(f"--model {path}: {e}") from None
  instruct = cfg.get("model_type") == "instructblip"
  qtok = os.path.join(path, "qformer_tokenizer")
  if instruct and not os.path.isdir(qtok):
    raise UsageError(f"--model {path}: an InstructBLIP checkpoint needs its Q-Former (BERT) tokenizer in {qtok} "
                     "(InstructBlipProcessor.save_pretrained writes it there)")
  vision = cfg.get("vision_config") or {}
  qformer = cfg.get("qformer_config") or {}
  return dict(architecture=GENERATION_ARCHS[1] if instruct else GENERATION_ARCHS[0], family=family,
              instruct=instruct, image_size=int(vision.get("image_size", 224)),
              patch_size=int(vision.get("patch_size", 14)), num_query_tokens=int(cfg.get("num_query_tokens", 32)),
              cross_attention_frequency=int(qformer.get("cross_attention_frequency", 2)),
              qformer_tokenizer=qtok if instruct else "")


# ----------------------------------------------------------------------------------------
# data


def check_data(path: str, images_dir: str, kinds, what: str, allow_outside: bool = False) -> int:
  """Validates an annotation file up front (records, and every image file's existence and header);
  raises UsageError with the report; returns its record count."""
  options.check_input_file(path, what)
  if not os.path.isdir(images_dir):
    raise UsageError(f"images directory {images_dir} (for {what} {path}) not found")
  try:
    problems = annotations.validate_annotations(path, images_dir, kinds=kinds, check_images=True,
                                                allow_outside_images_dir=allow_outside)
  except annotations.AnnotationError as e:  # a byte that is not UTF-8: FILE:LINE:COLUMN
    raise UsageError(f"{what} {e}") from None
  except (ValueError, UnicodeDecodeError) as e:  # not JSON, JSON Lines or a COCO file at all
    raise UsageError(f"{what} {path}: {e}") from None
  if problems:
    raise UsageError(annotations.format_problems(problems, path) + f"\n(images are looked up under {images_dir})")
  n = len(annotations.read_annotations(path))
  if n == 0:
    raise UsageError(f"{what} {path}: no records")
  return n


def check_capfilt(path: str, task: str) -> int:
  """A CapFilt output directory as --train: UsageError unless it is one with a complete shard and the
  task trains on captions; returns its image count."""
  if not capfilt_shards.is_capfilt_dir(path):
    raise UsageError(f"--train {path}: a directory, but not a CapFilt output ({capfilt_shards.RUN_FILE}); "
                     "--train takes a JSONL file or a CapFilt output directory")
  if "caption" not in TRAIN_KINDS[task]:
    raise UsageError(f"--train {path}: a CapFilt output holds caption records; --task {task} trains on "
                     f"{' or '.join(TRAIN_KINDS[task])} records")
  try:
    capfilt_shards.array_record_paths(path)
  except FileNotFoundError as e:
    raise UsageError(f"--train {path}: {e}") from None
  return capfilt_shards.summary(path)["kept"]


# ----------------------------------------------------------------------------------------
# config


def _configs_module(name: str):
  try:
    return recipe_module(name)
  except ImportError as e:
    raise UsageError(str(e)) from e


def recipe(task: str, ckpt: dict):
  """The task's recipe (configs/), before the paths and the dataset-dependent fields are filled in."""
  import ml_collections
  fam = ckpt["family"]
  if task == "caption":
    c = _configs_module("caption_ft").get_config("llm=" + {"t5": "flant5xl", "llama": "vicuna7b"}.get(fam, "opt2.7b"))
  elif task == "vqa":
    c = _configs_module("vqa_ft").get_config("llm=" + {"t5": "flant5xl", "llama": "vicuna7b"}.get(fam, "opt2.7b"))
  else:
    c = _configs_module("instruct").get_config("llm=" + ("flant5xl" if fam == "t5" else "vicuna7b"))
    c.model.image_size = ckpt["image_size"]  # InstructBLIP fine-tunes at its pre-training resolution
    c.total_steps, c.num_epochs = 0, 5
  c.model.family = fam
  c.model.architecture = ckpt["architecture"]
  c.model.init = "pretrained"
  # the checkpoint's own sizes (loading ignores the recipe's), so that --print-config tells the truth
  c.model.num_query_tokens = ckpt["num_query_tokens"]
  c.model.cross_attention_frequency = ckpt["cross_attention_frequency"]
  c.eval.update(EVAL[task])
  # fields some recipes lack: added here so that --set can reach them
  if "layer_decay" not in c.optim:
    c.optim.layer_decay = 1.0
  if "vqa_prompt" not in c.loss:
    c.loss.vqa_prompt = ""
  c.best_metric = tasks.get(task).metric
  c.eval_at_start = True
  return ml_collections.ConfigDict(c)


# Fields that come from --model: fine-tuning keeps the checkpoint's architecture, so --set may not change them.
CHECKPOINT_KEYS = ("model.init", "model.architecture", "model.family", "model.pretrained", "model.num_query_tokens",
                   "model.cross_attention_frequency", "model.hf_config", "model.vision", "model.qformer_bert",
                   "model.language_model")


def _check_overrides(items) -> None:
  """UsageError for a --set of a field that comes from the checkpoint."""
  for item in items:
    key = item.partition("=")[0].strip()
    owner = next((k for k in CHECKPOINT_KEYS if key == k or key.startswith(k + ".")), None)
    if owner:
      raise UsageError(f"--set {item}: comes from the checkpoint (--model); fine-tuning keeps its architecture"
                       + ("" if owner == key else f" ({owner})"))


def validate_config(c, over: set[str], ckpt: dict) -> None:
  """UsageError naming the first field with a value training would fail on (after --set, before anything
  is created): "--set KEY=VALUE: problem" for a field the user set, "config KEY=VALUE: problem" otherwise."""
  validate.check_values(c, overridden=over, prefix="--set ", patch_size=ckpt["patch_size"])


def build_config(args, ckpt: dict):
  """The full training config: recipe + paths + per-epoch evaluation + --set overrides, validated."""
  c = recipe(args.task, ckpt)
  c.model.pretrained = args.model
  c.tokenizer.llm = args.model
  c.tokenizer.qformer = ckpt["qformer_tokenizer"]
  if os.path.isdir(args.train):  # a CapFilt output (check_capfilt)
    c.data.source, c.data.array_record = "array_record", os.path.abspath(args.train)
  else:
    c.data.source = "annotations"
    c.data.annotations = os.path.abspath(args.train)
    c.data.images_dir = os.path.abspath(args.images_dir)
  c.data.eval_annotations = os.path.abspath(args.val) if args.val else ""
  c.data.eval_images_dir = os.path.abspath(args.val_images_dir or args.images_dir) if args.val else ""
  c.eval.num_records = 0  # all of --val
  warmup = int(c.optim.warmup_steps)
  _check_overrides(args.set or [])
  over = options.apply_overrides(c, args.set or [], flag="--set ")
  validate_config(c, over, ckpt)
  if os.path.isdir(args.train):
    records = capfilt_shards.summary(args.train)["kept"]  # one record per image
  else:
    records = len(sources.AnnotationSource.from_file(args.train, args.images_dir))  # caption lists expand
  per_epoch = records // int(c.global_batch_size)
  if per_epoch < 1:
    raise UsageError(f"--train has {records} training examples: no full batch of global_batch_size "
                     f"{c.global_batch_size}; lower it, e.g. --set global_batch_size={max(1, records // 4)}")
  steps = int(c.total_steps) or int(c.num_epochs) * per_epoch
  if "optim.warmup_steps" not in over:
    c.optim.warmup_steps = min(warmup, max(steps // 10, 0))
  if "eval_every" not in over:
    c.eval_every = per_epoch if args.val else -1
  if "checkpoint_every" not in over:
    c.checkpoint_every = per_epoch  # the latest train state after every epoch (and on preemption)
  if "log_every" not in over:
    c.log_every = max(1, min(int(c.log_every), per_epoch))
  if not args.val:
    c.best_metric, c.eval_at_start = "", False
  return c, per_epoch, steps


# ----------------------------------------------------------------------------------------
# CLI


def parser() -> argparse.ArgumentParser:
  p = options.Parser(prog="python -m blip2_jax.finetune", description=__doc__.split("\n\n")[0],
                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  options.add_model_arg(p, "HF directory of a BLIP-2 / InstructBLIP model (save_pretrained)", required=True)
  p.add_argument("--task", required=True, choices=TASKS)
  p.add_argument("--train", required=True, help="training annotations (JSONL, format below) or a CapFilt output "
                 "directory")
  p.add_argument("--val", default="", help="validation annotations (JSONL), evaluated every epoch; "
                 "without it there is no evaluation and no WORKDIR/best")
  p.add_argument("--images-dir", default=None, help="image paths are relative to this (default: --train's directory)")
  p.add_argument("--val-images-dir", default=None, help="for --val (default: --images-dir)")
  p.add_argument("--workdir", required=True, help="checkpoints, metrics, WORKDIR/best and WORKDIR/hf (rerun to resume)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field (repeatable): optim.lr=3e-5, global_batch_size=32, num_epochs=3, "
                      "model.image_size=224, mesh=1,8,1, frozen=model/language_model/.*, eval.num_beams=1, "
                      "model.dtype=float32, ... (see --print-config)")
  p.add_argument("--print-config", action="store_true", help="check the data, print the resolved config and exit")
  options.add_image_args(p, annotations_dir=True)
  # the trainer's (absl) spellings are accepted too: --max_steps, --num_processes, --process_id
  p.add_argument("--max-steps", "--max_steps", dest="max_steps", type=options.positive_int, default=None,
                 help="stop after this many steps of this run (checkpointed)")
  p.add_argument("--allow-config-change", "--allow_config_change", dest="allow_config_change", default="",
                 metavar="KEY[,KEY...]", help="config keys a resumed run may change (e.g. num_epochs,optim.lr; 'all' "
                 "for any); a resume under another config is refused otherwise")
  p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
  p.add_argument("--coordinator", default=None, help="host:port of process 0 (with --distributed)")
  p.add_argument("--num-processes", "--num_processes", dest="num_processes", type=options.positive_int, default=None,
                 help="number of processes (with --distributed)")
  p.add_argument("--process-id", "--process_id", dest="process_id", type=options.nonnegative_int, default=None,
                 help="this process's index (with --distributed)")
  return p


def main(argv=None) -> int:
  return options.run(_main, argv)


def _main(argv) -> int:
  args = parser().parse_args(argv)
  options.apply_image_args(args)
  if args.images_dir is None:
    args.images_dir = os.path.dirname(os.path.abspath(args.train))
  outside = args.allow_outside_images_dir
  if os.path.isdir(args.train):
    n_train = check_capfilt(args.train, args.task)
  else:
    n_train = check_data(args.train, args.images_dir, TRAIN_KINDS[args.task], "--train", outside)
  if args.val:
    check_data(args.val, args.val_images_dir or args.images_dir, VAL_KINDS[args.task], "--val", outside)
  args.model = options.model_dir(args.model, revision=args.revision)  # after the cheap checks: it may download
  ckpt = inspect_checkpoint(args.model)
  config, per_epoch, steps = build_config(args, ckpt)
  if args.print_config:
    print(config)
    return 0
  options.check_new_dir(args.workdir, "--workdir")
  allow = [k.strip() for k in args.allow_config_change.split(",") if k.strip()]
  run_config.check_resume(args.workdir, config, allow, resuming=run_config.has_checkpoint(args.workdir))
  if args.process_id is not None and args.num_processes is not None and args.process_id >= args.num_processes:
    raise UsageError(f"--process-id {args.process_id}: must be below --num-processes {args.num_processes}")
  if args.task != "caption":
    where = "the Q-Former and the LLM" if ckpt["instruct"] else "the LLM only (a BLIP-2 Q-Former has no text input)"
    print(f"{ckpt['architecture']}: the {'question' if args.task == 'vqa' else 'instruction'} goes to {where}")
  print(f"{args.task}: {n_train} records, {per_epoch} steps per epoch of {config.global_batch_size}, {steps} steps")

  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save step at INFO
  created = not os.path.exists(args.workdir)
  try:
    sharding.initialize_distributed(args.distributed, coordinator=args.coordinator, num_processes=args.num_processes,
                                    process_id=args.process_id)
    loop.train(config, args.workdir, max_steps=args.max_steps,  # prints where the best and the final model went
               allow_config_change=allow)
  except BaseException:
    if created:
      options.remove_if_empty(args.workdir)
    raise
  return 0


if __name__ == "__main__":
  sys.exit(main())
