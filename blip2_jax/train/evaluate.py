"""Periodic evaluation inside training: retrieval R@K (stage-1 tasks) and captions (LM tasks) on a
held-out set, built once per run (`make_eval_set`) and scored with the current params (`evaluate`).

Eval data (`make_eval_set`):
  * data.source == "shapes": `ShapesSource(eval.num_records, split="test", seed=seed + 1)`, the
    held-out (colour, shape) combinations the train split never shows;
  * otherwise data.eval_annotations (a LAVIS / COCO / JSONL file) with images under
    data.eval_images_dir (default data.images_dir; default: the file's directory). Its records are of
    one kind (`data.annotations.TEXT_SCHEMAS`): captions (a caption list keeps every caption as a
    reference, records with one caption each are grouped by image; the first eval.num_records images,
    0: all), VQA {"question", "answers"} or instructions {"instruction", "response"} (one item per
    record, the first eval.num_records, 0: all).
  * nothing configured -> None: the loop skips evaluation.
Images get the eval transform (`processing.ImageProcessor(model.image_size)`) once, up front (unreadable
ones are left out with a warning); a set larger than PRELOAD_BYTES keeps its paths instead and is
decoded batch by batch at each evaluation (unreadable images then count as wrong answers).

Metrics (`evaluate`), python floats; recall and exact match in percent, BLEU / CIDEr on the
pycocoevalcap scale (fractions):
  stage1 / retrieval: eval/txt_r1, eval/txt_r5 (image -> text), eval/img_r1, eval/img_r5
    (text -> image), eval/r_mean, from ITC + ITM re-ranking of each query's top eval.k
    (`inference.retrieval_scores`, as LAVIS), and eval/itc_txt_r1, eval/itc_img_r1 from ITC alone;
    plus Q-Former (ITG head) captions of the first eval.num_examples images as "eval/examples".
    Texts are de-duplicated (after `pre_caption`) and a query counts as found when ANY matching
    item is ranked high enough: synthetic scenes repeat captions, and a scene ranked above an
    identical-caption twin is not an error. With one distinct caption per image this is exactly
    `evaluation.retrieval_recall` (LAVIS `report_metrics`).
  stage2 / caption / instruct on caption data: greedy (eval.num_beams) captions of every eval image with
    `inference.caption` (prompt loss.prompt; instruct: `tasks.DEFAULT_INSTRUCTION`), scored
    eval/caption_exact (normalised as `pre_caption`, against any reference), eval/bleu4, eval/cider
    (`evaluation.evaluate_captions`); "eval/examples": [(first reference, prediction), ...].
  VQA data: `inference.answer` (prompt loss.vqa_prompt, default "Question: {} Answer:" / "... Short
    answer:" for T5; InstructBLIP: also to the Q-Former), eval.num_beams / eval.max_new_tokens and
    LAVIS's other VQA settings, scored eval/vqa_acc (VQAv2 accuracy, percent, `evaluation.vqa_accuracy`).
  instruction data: the instruction as the prompt (`inference.caption`), scored eval/exact_match
    (percent of responses equal to the reference after `pre_caption` normalisation).
  eval/num_images, eval/time_s.
Each task's headline metric (what the loop's best checkpoint tracks) is its `tasks.Task.metric`.

Compiles: every call runs fixed shapes (images in batches of eval.batch_size, the last padded; the
text width is data.max_txt_len; prompts are padded to the longest of the set), so the jitted programs
compile at the first evaluation and are reused by the later ones. Params may be sharded jax arrays and frozen towers
bfloat16: the jitted functions take them as they are. Multi-process runs (jax.process_count() > 1)
skip evaluation with a warning: the inference helpers read results back with np.asarray, which
needs every output shard on this host.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np

from blip2_jax import evaluation, inference
from blip2_jax.data import annotations, processing, synthetic
from blip2_jax.data.transforms import pre_caption
from blip2_jax.evaluation.retrieval import ranks_i2t
from blip2_jax.train import tasks

log = logging.getLogger("blip2_jax.train")

# Defaults of config.eval (used for fields a config does not set).
EVAL_DEFAULTS = dict(num_records=32, batch_size=16, max_new_tokens=20, num_beams=1, k=16, num_examples=4)
PRELOAD_BYTES = 1 << 30  # eval sets up to this size (float32 pixels) are decoded once, larger ones per use


@dataclasses.dataclass
class EvalSet:
  pixel_values: np.ndarray        # (N, S, S, 3) float32, eval transform
  references: list[list[str]]     # per image: its captions, as given (caption metrics)
  texts: list[str]                # distinct `pre_caption`ed captions (retrieval)
  img2txt: list[list[int]]        # image i -> indices into texts of its captions
  txt2img: list[list[int]]        # text t -> every image that has it as a caption
  input_ids: np.ndarray | None = None       # (T, max_txt_len) int32, Q-Former tokens of texts (stage 1)
  attention_mask: np.ndarray | None = None
  names: list[str] = dataclasses.field(default_factory=list)
  kind: str = "caption"           # caption | vqa (references = answers) | instruction (references = [response])
  prompts: list[str] | None = None  # vqa: the questions; instruction: the instructions
  paths: list[str] | None = None  # a large set: image paths, decoded at each use (pixel_values is None)

  def __len__(self) -> int:
    return len(self.references)

  @property
  def images(self):
    """What the inference helpers take: the preprocessed pixels, or the paths."""
    return self.pixel_values if self.pixel_values is not None else self.paths


def eval_options(config) -> dict:
  """config.eval over EVAL_DEFAULTS."""
  e = config.get("eval", None)
  out = dict(EVAL_DEFAULTS)
  if e is not None:
    out.update({k: e[k] for k in e.keys()} if hasattr(e, "keys") else dict(e))
  return out


def _normalise(text: str) -> str:
  return pre_caption(str(text), 10_000)


def _records(config, limit: int):
  """-> (images (uint8 arrays or paths), references, names, kind, prompts), or None without eval data."""
  d = config.data
  if d.source == "shapes":
    src = synthetic.ShapesSource(max(1, limit or EVAL_DEFAULTS["num_records"]), split="test",
                                 seed=int(config.seed) + 1, size=max(64, int(config.model.image_size)))
    recs = [src[i] for i in range(len(src))]
    return ([r["image"] for r in recs], [[r["caption"]] for r in recs], [f"shapes/test/{i}" for i in range(len(src))],
            "caption", None)
  path = d.get("eval_annotations", "")
  if not path:
    return None
  raw = annotations.read_annotations(path)
  root = d.get("eval_images_dir", "") or d.get("images_dir", "") or os.path.dirname(os.path.abspath(path))
  kinds = {annotations.schema_of(r) for r in raw}
  if len(kinds) != 1 or None in kinds:
    raise ValueError(f"{path}: eval records must all be of one kind (caption, vqa or instruction records), "
                     f"found {sorted(str(k) for k in kinds)}; run data.validate_annotations for a report")
  kind = kinds.pop()
  if kind != "caption":
    if tasks.get(config.task).stage1:
      raise ValueError(f"{path}: {config.task} evaluation needs caption records, not {kind} records")
    recs = raw[:limit] if limit else raw
    for n, r in enumerate(recs, 1):
      if not isinstance(r.get("image"), str):
        raise ValueError(f"{path}: record {n} needs an \"image\" path")
    if kind == "vqa":
      refs = [[str(a) for a in (r["answers"] if isinstance(r["answers"], list) else [r["answers"]])] for r in recs]
      prompts = [str(r["question"]) for r in recs]
    else:
      refs, prompts = [[str(r["response"])] for r in recs], [str(r["instruction"]) for r in recs]
    names = [r["image"] for r in recs]
    return [os.path.join(root, n) for n in names], refs, names, kind, prompts
  by_image: dict[str, list[str]] = {}
  for n, r in enumerate(raw, 1):
    img, cap = r.get("image"), r.get("caption")
    if not isinstance(img, str) or cap is None:
      raise ValueError(f"{path}: record {n} needs \"image\" and \"caption\" for caption / retrieval evaluation")
    caps = [cap] if isinstance(cap, str) else [str(c) for c in cap]
    if not caps:
      continue
    if img not in by_image and limit and len(by_image) >= limit:
      continue
    by_image.setdefault(img, []).extend(caps)
  if not by_image:
    raise ValueError(f"{path}: no captioned images")
  names = list(by_image)
  return [os.path.join(root, n) for n in names], [by_image[n] for n in names], names, "caption", None


def make_eval_set(config, setup) -> EvalSet | None:
  """The held-out set `config` describes (module docstring), preprocessed; None when none is configured."""
  opts = eval_options(config)
  got = _records(config, int(opts["num_records"]))
  if got is None:
    log.info("no eval data (data.eval_annotations is empty): evaluation is skipped")
    return None
  images, refs, names, kind, prompts = got
  size = int(config.model.image_size)
  if not tasks.get(config.task).stage1 and all(isinstance(im, str) for im in images) and \
      len(images) * size * size * 3 * 4 > PRELOAD_BYTES:
    log.info("eval: %d images, more than %d MiB as pixels: decoded at each evaluation", len(images),
             PRELOAD_BYTES >> 20)
    return EvalSet(None, refs, [], [], [], names=names, kind=kind, prompts=prompts, paths=list(images))
  proc = processing.ImageProcessor(size)
  px, keep = [], []
  for i, im in enumerate(images):
    try:
      px.append(proc.preprocess_one(im))
      keep.append(i)
    except processing.ImageLoadError as e:
      log.warning("eval: leaving out %s: %s", names[i], e)
  if not keep:
    raise ValueError("eval: none of the eval images could be read")
  refs, names = [refs[i] for i in keep], [names[i] for i in keep]
  prompts = None if prompts is None else [prompts[i] for i in keep]
  if kind != "caption":
    return EvalSet(np.stack(px).astype(np.float32), refs, [], [], [], names=names, kind=kind, prompts=prompts)

  max_words = int(config.data.get("max_words", 50))
  texts: list[str] = []
  index: dict[str, int] = {}
  img2txt: list[list[int]] = []
  for rs in refs:
    row = []
    for r in rs:
      t = pre_caption(r, max_words)
      if t not in index:
        index[t] = len(texts)
        texts.append(t)
      if index[t] not in row:
        row.append(index[t])
    img2txt.append(row)
  txt2img: list[list[int]] = [[] for _ in texts]
  for i, row in enumerate(img2txt):
    for t in row:
      txt2img[t].append(i)

  ids = mask = None
  if tasks.get(config.task).stage1:
    tok = setup.qformer_tokenizer
    enc = tok(texts, padding="max_length", truncation=True, max_length=int(config.data.max_txt_len),
              return_tensors="np")
    ids, mask = np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)
  return EvalSet(np.stack(px).astype(np.float32), refs, texts, img2txt, txt2img, ids, mask, names)


def recall_at(sim: np.ndarray, positives: list[list[int]], ks=(1, 5)) -> dict[int, float]:
  """R@K in percent for rows of `sim` (queries x candidates) with several correct candidates each:
  a query's rank is the number of wrong candidates scoring >= its best correct one (ties count
  against it, as `evaluation.retrieval`)."""
  r = ranks_i2t(np.asarray(sim), positives)
  return {k: 100.0 * float(np.mean(r < k)) for k in ks}


def _retrieval(config, setup, params_tree, es: EvalSet, opts: dict) -> dict:
  s = inference.retrieval_scores(setup.model, params_tree["model"], es.pixel_values, es.input_ids,
                                 es.attention_mask, k=int(opts["k"]), batch_size=int(opts["batch_size"]))
  out = {}
  ti, it = recall_at(s["i2t"], es.img2txt), recall_at(s["t2i"], es.txt2img)
  for k in (1, 5):
    out[f"eval/txt_r{k}"] = ti[k]
  for k in (1, 5):
    out[f"eval/img_r{k}"] = it[k]
  out["eval/r_mean"] = (ti[1] + ti[5] + it[1] + it[5]) / 4
  out["eval/itc_txt_r1"] = recall_at(s["itc"], es.img2txt, (1,))[1]
  out["eval/itc_img_r1"] = recall_at(s["itc"].T, es.txt2img, (1,))[1]
  n = min(int(opts["num_examples"]), len(es))
  if n and "qformer_lm_head" in params_tree:
    caps = inference.caption(setup.model, params_tree["model"], setup.qformer_tokenizer, es.pixel_values[:n],
                             qformer_lm_head=params_tree["qformer_lm_head"], prompt="", batch_size=n,
                             num_beams=int(opts["num_beams"]), max_new_tokens=int(opts["max_new_tokens"]),
                             min_new_tokens=0)
    out["eval/examples"] = [(es.references[i][0], caps[i]) for i in range(n)]
  return out


def caption_prompt(config) -> str:
  """The task's own evaluation prompt (instruct: InstructBLIP's captioning template), else loss.prompt."""
  return tasks.get(config.task).prompt or str(config.loss.get("prompt", "") or "")


def _captions(config, setup, params_tree, es: EvalSet, opts: dict) -> dict:
  preds = inference.caption(setup.model, params_tree["model"], setup.llm_tokenizer, es.images,
                            prompt=caption_prompt(config), batch_size=int(opts["batch_size"]),
                            qformer_tokenizer=setup.qformer_tokenizer, num_beams=int(opts["num_beams"]),
                            max_new_tokens=int(opts["max_new_tokens"]), min_new_tokens=0, errors=[])
  preds = [p or "" for p in preds]
  exact = [_normalise(p) in {_normalise(r) for r in rs} for p, rs in zip(preds, es.references)]
  m = evaluation.evaluate_captions(preds, es.references)
  n = min(int(opts["num_examples"]), len(es))
  return {"eval/caption_exact": 100.0 * float(np.mean(exact)), "eval/bleu4": float(m["Bleu_4"]),
          "eval/cider": float(m["CIDEr"]), "eval/examples": [(es.references[i][0], preds[i]) for i in range(n)]}


def _answers(config, setup, params_tree, es: EvalSet, opts: dict) -> dict:
  """VQA accuracy of `inference.answer` on the questions (module docstring)."""
  template = str(config.loss.get("vqa_prompt", "") or "") or None
  preds = inference.answer(setup.model, params_tree["model"], setup.llm_tokenizer, es.images, es.prompts,
                           batch_size=int(opts["batch_size"]), qformer_tokenizer=setup.qformer_tokenizer,
                           prompt_template=template, num_beams=int(opts["num_beams"]),
                           max_new_tokens=int(opts["max_new_tokens"]), errors=[],
                           chat_template=bool(config.loss.get("chat_template", False)))
  preds = [p or "" for p in preds]
  n = min(int(opts["num_examples"]), len(es))
  return {"eval/vqa_acc": float(evaluation.vqa_accuracy(preds, es.references)),
          "eval/examples": [(es.prompts[i], es.references[i][0], preds[i]) for i in range(n)]}


def _responses(config, setup, params_tree, es: EvalSet, opts: dict) -> dict:
  """Exact match of the generated responses to the instructions (module docstring)."""
  preds = inference.caption(setup.model, params_tree["model"], setup.llm_tokenizer, es.images, prompt=es.prompts,
                            batch_size=int(opts["batch_size"]), qformer_tokenizer=setup.qformer_tokenizer,
                            num_beams=int(opts["num_beams"]), max_new_tokens=int(opts["max_new_tokens"]),
                            min_new_tokens=0, errors=[], chat_template=bool(config.loss.get("chat_template", False)))
  preds = [p or "" for p in preds]
  exact = [_normalise(p) in {_normalise(r) for r in rs} for p, rs in zip(preds, es.references)]
  n = min(int(opts["num_examples"]), len(es))
  return {"eval/exact_match": 100.0 * float(np.mean(exact)),
          "eval/examples": [(es.prompts[i], es.references[i][0], preds[i]) for i in range(n)]}


def evaluate(config, setup, params_tree, eval_set: EvalSet | None) -> dict:
  """Metrics of `params_tree` (the training tree: {"model": ..., ["qformer_lm_head", "temp"]}) on
  `eval_set` (module docstring); {} when there is no eval set or in a multi-process run."""
  if eval_set is None:
    return {}
  import jax
  if jax.process_count() > 1:
    log.warning("evaluation inside training runs in single-process jobs only: skipped")
    return {}
  t0 = time.time()
  opts = eval_options(config)
  if tasks.get(config.task).stage1:
    out = _retrieval(config, setup, params_tree, eval_set, opts)
  elif eval_set.kind == "vqa":
    out = _answers(config, setup, params_tree, eval_set, opts)
  elif eval_set.kind == "instruction":
    out = _responses(config, setup, params_tree, eval_set, opts)
  else:
    out = _captions(config, setup, params_tree, eval_set, opts)
  out["eval/num_images"] = float(len(eval_set))
  out["eval/time_s"] = time.time() - t0
  return out
