"""End to end: python -m blip2_jax.caption / vqa / evaluate on tiny random checkpoints.

Captions and answers are checked against transformers' generate on the same pixel values and
prompt (decoded with the same tokenizer); evaluation metrics against the metric functions called on
the written predictions. CLIs run in-process through main(argv); one subprocess smoke run.
Generation options are small (3 beams, <= 5 new tokens) and shared between tests, so the compiles
are shared too (equal checkpoints give equal models, which hit the same compile cache).
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from blip2_jax import data, evaluation
from blip2_jax.checkpoints import tiny
from blip2_jax.cli import caption as caption_cli
from blip2_jax.cli import evaluate as evaluate_cli
from blip2_jax.cli import vqa as vqa_cli
from blip2_jax.data import processing

GEN = ["--num-beams", "3", "--max-new-tokens", "5", "--min-new-tokens", "2", "--batch-size", "2"]
HF_GEN = dict(num_beams=3, max_new_tokens=5, min_new_tokens=2, do_sample=False)
VQA_GEN = ["--num-beams", "3", "--max-new-tokens", "4", "--batch-size", "2"]
HF_VQA_GEN = dict(num_beams=3, max_new_tokens=4, min_new_tokens=1, length_penalty=-1.0, do_sample=False)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """Tiny checkpoints, built on first use and shared by the module."""
  root = tmp_path_factory.mktemp("ckpts")
  made = {}

  def get(name):
    if name not in made:
      arch, fam = {"opt": ("Blip2ForConditionalGeneration", "opt"), "t5": ("Blip2ForConditionalGeneration", "t5"),
                   "ret": ("Blip2ForImageTextRetrieval", None),
                   "instruct_llama": ("InstructBlipForConditionalGeneration", "llama")}[name]
      made[name] = tiny.save_tiny(str(root / name), arch, fam)
    return made[name]
  return get


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """imgs/: a.png (40x30 RGB), b.png (28x28 RGB), c.jpg (25x33 greyscale)."""
  from PIL import Image
  d = tmp_path_factory.mktemp("imgs")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(d / "a.png")
  Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(d / "b.png")
  Image.fromarray(rng.integers(0, 256, (33, 25), dtype=np.uint8)).save(d / "c.jpg")
  return d


def _hf_texts(d, arch, paths, prompts, **gen):
  """transformers generate, one image at a time (no padding), decoded like ours."""
  hf = getattr(transformers, arch).from_pretrained(d, attn_implementation="eager").eval()
  cfg = hf.config
  tok = processing.load_tokenizer(d)
  proc = processing.ImageProcessor.from_pretrained(d)
  fam = processing.family_of(d)
  out = []
  for path, prompt in zip(paths, prompts):
    px = torch.from_numpy(proc([path])).permute(0, 3, 1, 2)
    ids = processing.tokenize_prompts(tok, [prompt], fam)["input_ids"][0].tolist()
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_query_tokens + ids])
    kw = {}
    if arch.startswith("Instruct"):
      qt = processing.load_tokenizer(os.path.join(d, "qformer_tokenizer"))(prompt, return_tensors="pt")
      kw = dict(qformer_input_ids=qt["input_ids"], qformer_attention_mask=qt["attention_mask"])
    with torch.no_grad():
      out_ = hf.generate(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids),
                         return_dict_in_generate=True, output_scores=True, **kw, **gen)
    seq = out_.sequences[0, out_.sequences.shape[1] - len(out_.scores):]  # new tokens only
    out.append(tok.decode(seq, skip_special_tokens=True).strip())
  return out


def _lines(capsys):
  return [ln.split("\t") for ln in capsys.readouterr().out.splitlines() if ln]


# ----------------------------------------------------------------------------------------
# caption


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_caption_cli_matches_hf(ckpts, images, tmp_path, capsys, family):
  d = ckpts(family)
  out = tmp_path / "caps.jsonl"
  if family == "opt":  # the directory form
    argv = ["--model", d, "--images-dir", str(images), "--output", str(out)]
    names = ["a.png", "b.png", "c.jpg"]
  else:  # explicit files, in the given order
    names = [str(images / "c.jpg"), str(images / "a.png")]
    argv = ["--model", d, *names, "--output", str(out)]
  assert caption_cli.main(argv + GEN) == 0
  lines = _lines(capsys)
  assert [n for n, _ in lines] == names
  caps = [c for _, c in lines]
  assert all(caps)
  assert [json.loads(ln) for ln in out.read_text().splitlines()] == [
      {"image": n, "caption": c} for n, c in lines]
  paths = [os.path.join(images, n) for n in names]
  assert caps == _hf_texts(d, "Blip2ForConditionalGeneration", paths, ["a photo of"] * len(paths), **HF_GEN)


def test_caption_instructblip_llama_matches_hf(ckpts, images, capsys):
  d = ckpts("instruct_llama")
  paths = [str(images / "a.png"), str(images / "b.png")]
  assert caption_cli.main(["--model", d, *paths, "--prompt", "what is in the picture"] + GEN) == 0
  caps = [c for _, c in _lines(capsys)]
  assert caps == _hf_texts(d, "InstructBlipForConditionalGeneration", paths, ["what is in the picture"] * 2,
                           **HF_GEN)


def test_caption_cli_skips_unreadable(ckpts, images, tmp_path, capsys):
  import shutil
  shutil.copy(images / "a.png", tmp_path / "good.png")
  (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  assert caption_cli.main(["--model", ckpts("opt"), "--images-dir", str(tmp_path)] + GEN) == 1
  cap = capsys.readouterr()
  lines = [ln.split("\t") for ln in cap.out.splitlines()]
  assert [n for n, _ in lines] == ["good.png"]
  assert "skipped 1 unreadable image" in cap.err and "broken.png" in cap.err


def _usage_error(main, argv, capsys, pattern):
  """Bad input: exit status 2 and one stderr line matching `pattern` (tests/test_cli_errors.py has the rest)."""
  capsys.readouterr()  # what came before (building a checkpoint for argv prints progress bars)
  assert main(argv) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and re.search(pattern, err[0]), err


def test_caption_cli_errors(ckpts, images, capsys):
  _usage_error(caption_cli.main, ["--model", ckpts("ret"), str(images / "a.png")], capsys,
               "stage-1 Blip2ForImageTextRetrieval checkpoint: it has no qformer_lm_head.safetensors")
  _usage_error(caption_cli.main, ["--model", ckpts("opt"), str(images / "nope.png")], capsys,
               "image file not found: .*nope.png")
  _usage_error(caption_cli.main, ["--model", ckpts("opt")], capsys, "no images")


def test_caption_library_rejects_retrieval_model(ckpts):
  import blip2_jax
  from blip2_jax import inference
  model, params = blip2_jax.from_pretrained(ckpts("ret"))
  tok = processing.load_tokenizer(ckpts("ret"))
  with pytest.raises(TypeError, match="has no language model; captioning it uses the Q-Former LM head"):
    inference.caption(model, params, tok, [np.zeros((28, 28, 3), np.uint8)])
  with pytest.raises(TypeError, match="VQA needs a checkpoint with a language model.*ConditionalGeneration; Blip2ForImageTextRetrieval has none"):
    inference.answer(model, params, tok, [np.zeros((28, 28, 3), np.uint8)], ["what"])


def test_caption_cli_stage1_qformer_head(ckpts, images, tmp_path, capsys):
  """A retrieval checkpoint + qformer_lm_head.safetensors captions with the Q-Former (LAVIS stage 1);
  the CLI's lines equal qformer_decoding.generate on the processor's pixels (which
  tests/decoding/test_qformer_decoding.py checks against transformers generate)."""
  import shutil

  import jax

  import blip2_jax
  from blip2_jax.checkpoints import hf as hf_io
  from blip2_jax.decoding import qformer as qformer_decoding
  from blip2_jax.models import qformer
  d = str(tmp_path / "stage1")
  shutil.copytree(ckpts("ret"), d)
  model, params = blip2_jax.from_pretrained(d)
  head = qformer.QFormerLMHead(model.config.qformer).init(jax.random.PRNGKey(0), *qformer.init_args(
      model.config.qformer)[0])["params"]
  head = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.PRNGKey(1), x.shape), head)
  hf_io.save_qformer_head(d, model, head)
  paths = [str(images / n) for n in ("a.png", "b.png", "c.jpg")]
  _usage_error(caption_cli.main, ["--model", d, *paths, "--prompt", "a photo of"], capsys, "takes no prompt")
  assert caption_cli.main(["--model", d, *paths, *GEN]) == 0
  lines = [ln.split("\t") for ln in capsys.readouterr().out.splitlines()]
  tok = processing.load_tokenizer(d)
  px = processing.ImageProcessor.from_pretrained(d)(paths)
  want = []
  for i in range(3):  # one image at a time: batching must not change a caption
    ids = qformer_decoding.generate(model, params, head, px[i:i + 1], bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                                    **{k: v for k, v in HF_GEN.items() if k != "do_sample"})
    want.append(tok.decode(np.asarray(ids)[0], skip_special_tokens=True).strip())
  assert lines == [[p, w] for p, w in zip(paths, want)]
  assert all(w for w in want), want  # non-empty captions


def test_caption_cli_subprocess_smoke(ckpts, images):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "blip2_jax.caption", "--model", ckpts("opt"), str(images / "b.png"),
                      "--num-beams", "1", "--max-new-tokens", "3", "--min-new-tokens", "0"],
                     capture_output=True, text=True, env=env, timeout=240)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert len(lines) == 1 and lines[0].startswith(str(images / "b.png") + "\t")


# ----------------------------------------------------------------------------------------
# vqa


def test_vqa_cli_matches_hf(ckpts, images, capsys):
  d = ckpts("opt")
  qs = ["what color is the car?", "how many dogs are there?"]  # as evaluate's: one compile serves both
  argv = ["--model", d, "--image", str(images / "a.png")]
  assert vqa_cli.main(argv + [a for q in qs for a in ("--question", q)] + VQA_GEN) == 0
  lines = _lines(capsys)
  assert [q for q, _ in lines] == qs
  ref = _hf_texts(d, "Blip2ForConditionalGeneration", [str(images / "a.png")] * 2,
                  [processing.vqa_prompt(q, "opt") for q in qs], **HF_VQA_GEN)
  assert [a for _, a in lines] == ref
  _usage_error(vqa_cli.main, ["--model", d, "--image", str(images / "nope.png"), "--question", "what"], capsys,
               "image file not found: .*nope.png")
  _usage_error(vqa_cli.main, ["--model", ckpts("ret"), "--image", str(images / "a.png"), "--question", "what"],
               capsys, "no language model")


# ----------------------------------------------------------------------------------------
# evaluate


def _evaluate(tmp_path, *args):
  out = tmp_path / "results.json"
  assert evaluate_cli.main([*args, "--output", str(out)]) == 0
  return json.loads(out.read_text())


REFS = {"a.png": ["a photo of a red car", "a car on the street"],
        "b.png": ["a dog sitting on the grass", "two dogs in a field", "a small dog"],
        "c.jpg": ["a black and white picture of a cat"]}


def test_evaluate_caption_both_formats(ckpts, images, tmp_path, capsys):
  d = ckpts("opt")
  karpathy = tmp_path / "karpathy.json"
  karpathy.write_text(json.dumps([{"image": k, "caption": v} for k, v in REFS.items()]))
  coco = tmp_path / "captions_val.json"
  coco.write_text(json.dumps({
      "images": [{"id": 10 + i, "file_name": k} for i, k in enumerate(REFS)] + [{"id": 99, "file_name": "x.png"}],
      "annotations": [{"image_id": 10 + i, "id": j, "caption": c} for i, v in enumerate(REFS.values())
                      for j, c in enumerate(v)]}))
  common = ["--task", "caption", "--model", d, "--images-dir", str(images)] + GEN
  res = _evaluate(tmp_path, *common, "--annotations", str(karpathy))
  printed = dict(_lines(capsys))
  assert res["task"] == "caption" and res["n"] == 3
  preds = res["predictions"]
  assert [p["image"] for p in preds] == list(REFS) and all(p["caption"] for p in preds)
  m = res["metrics"]
  assert set(m) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
  assert all(0 <= m[f"Bleu_{k}"] <= 1 for k in range(1, 5)) and m["CIDEr"] >= 0
  assert m == pytest.approx(evaluation.evaluate_captions([p["caption"] for p in preds], list(REFS.values())))
  assert {k: float(v) for k, v in printed.items()} == pytest.approx(m, abs=1e-4)
  # the captions are the caption CLI's; COCO format (image 99 has no caption: left out) gives the same
  res2 = _evaluate(tmp_path, *common, "--annotations", str(coco))
  assert res2["predictions"] == preds and res2["metrics"] == m
  res3 = _evaluate(tmp_path, *common, "--annotations", str(karpathy), "--limit", "2")
  assert res3["n"] == 2 and res3["predictions"] == preds[:2]


def test_evaluate_vqa_both_formats(ckpts, images, tmp_path, capsys):
  d = ckpts("opt")
  recs = [{"question_id": 7, "image": "a.png", "question": "What color is the car?",
           "answer": ["red"] * 4 + ["blue"] * 6},
          {"question_id": 8, "image": "b.png", "question": "How many dogs are there?", "answer": ["two"] * 10},
          {"question_id": 9, "image": "c.jpg", "question": "What is this?", "answer": ["cat", "dog"] * 5}]
  lavis = tmp_path / "vqa.json"
  lavis.write_text(json.dumps(recs))
  jsonl = tmp_path / "vqa.jsonl"
  jsonl.write_text("\n".join(json.dumps({"image": r["image"], "question": r["question"],
                                         "answers": [{"answer": a} for a in r["answer"]]}) for r in recs))
  common = ["--task", "vqa", "--model", d, "--images-dir", str(images)] + VQA_GEN
  res = _evaluate(tmp_path, *common, "--annotations", str(lavis))
  preds = res["predictions"]
  assert [p["question_id"] for p in preds] == [7, 8, 9]
  assert all(0 <= p["accuracy"] <= 1 and isinstance(p["answer"], str) for p in preds)
  acc = evaluation.vqa_accuracy([p["answer"] for p in preds], [r["answer"] for r in recs])
  assert res["metrics"] == {"accuracy": pytest.approx(acc)} and 0 <= acc <= 100
  assert float(dict(_lines(capsys))["accuracy"]) == pytest.approx(acc, abs=1e-4)
  res2 = _evaluate(tmp_path, *common, "--annotations", str(jsonl))
  assert [p["answer"] for p in res2["predictions"]] == [p["answer"] for p in preds]
  assert [p["question_id"] for p in res2["predictions"]] == [0, 1, 2]
  assert res2["metrics"] == res["metrics"]


def test_evaluate_retrieval(ckpts, images, tmp_path, capsys):
  ann = tmp_path / "ret.json"
  ann.write_text(json.dumps([{"image": k, "caption": v} for k, v in REFS.items()]))
  res = _evaluate(tmp_path, "--task", "retrieval", "--model", ckpts("ret"), "--images-dir", str(images),
                  "--annotations", str(ann), "--k", "4", "--batch-size", "4")
  m = res["metrics"]
  keys = [f"txt_r{k}" for k in (1, 5, 10)] + [f"img_r{k}" for k in (1, 5, 10)]
  assert set(m) == set(keys) | {"txt_r_mean", "img_r_mean", "r_mean"}
  assert all(0 <= v <= 100 for v in m.values())
  ims, txts = res["predictions"]["images"], res["predictions"]["texts"]
  assert len(ims) == 3 and len(txts) == 6
  assert txts[5]["image"] == 2 and txts[5]["text"] == "a black and white picture of a cat"
  for k in (1, 5, 10):  # the metrics are the ranks' recall
    assert m[f"txt_r{k}"] == pytest.approx(100 * np.mean([p["rank"] < k for p in ims]))
    assert m[f"img_r{k}"] == pytest.approx(100 * np.mean([p["rank"] < k for p in txts]))
  assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)
  assert m["txt_r10"] == 100 and m["img_r5"] == 100  # 6 texts, 3 images: every rank is within 10 / 5
  # and equal to the library path: retrieval_scores + retrieval_recall (i2t for txt_r*, t2i for img_r*)
  import blip2_jax
  from blip2_jax import inference
  model, params = blip2_jax.from_pretrained(ckpts("ret"))
  tok = processing.load_tokenizer(ckpts("ret"))
  px = processing.ImageProcessor.from_pretrained(ckpts("ret"))([str(images / k) for k in REFS])
  texts = [data.pre_caption(c) for v in REFS.values() for c in v]
  enc = tok(texts, padding="max_length", truncation=True, max_length=35, return_tensors="np")
  s = inference.retrieval_scores(model, params, px, enc["input_ids"], enc["attention_mask"], k=4, batch_size=4)
  t2i, i2t = evaluation.coco_style_maps([2, 3, 1])
  ref_i2t = evaluation.retrieval_recall(s["i2t"], t2i, i2t)
  ref_t2i = evaluation.retrieval_recall(s["t2i"].T, t2i, i2t)
  for key in m:
    if key != "r_mean":
      assert m[key] == (ref_i2t if key.startswith("txt") else ref_t2i)[key], key


def test_evaluate_errors(ckpts, images, tmp_path, capsys):
  ok = tmp_path / "ok.json"
  ok.write_text(json.dumps([{"image": "a.png", "caption": ["a car"]}]))
  base = ["--images-dir", str(images), "--annotations", str(ok)]
  for task in ("caption", "vqa"):
    _usage_error(evaluate_cli.main, ["--task", task, "--model", ckpts("ret"), *base], capsys,
                 "Blip2ForImageTextRetrieval checkpoint, which has no language model")
  _usage_error(evaluate_cli.main, ["--task", "retrieval", "--model", ckpts("opt"), *base], capsys,
               "is a Blip2ForConditionalGeneration checkpoint; retrieval evaluation needs")
  gen = ["--model", ckpts("opt"), "--images-dir", str(images), "--annotations"]
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"image": "a.png", "caption": ["x"]}, {"image": "b.png", "captions": ["y"]}]))
  _usage_error(evaluate_cli.main, ["--task", "caption", *gen, str(bad)], capsys,
               r"bad.json: record 2: no 'caption' key")  # records count from 1, as finetune's
  bad.write_text(json.dumps([{"image": "a.png", "question": "what"}]))
  _usage_error(evaluate_cli.main, ["--task", "vqa", *gen, str(bad)], capsys, r"record 1: no 'answer' key")
  bad.write_text("{not json")
  _usage_error(evaluate_cli.main, ["--task", "caption", *gen, str(bad)], capsys, "bad.json is not valid JSON")
  _usage_error(evaluate_cli.main, ["--task", "caption", *gen, str(tmp_path / "nope.json")], capsys,
               "annotation file not found: .*nope.json")
  missing = tmp_path / "missing.json"
  missing.write_text(json.dumps([{"image": "a.png", "caption": ["x"]},
                                 {"image": "sub/gone.jpg", "caption": ["y"]}]))
  _usage_error(evaluate_cli.main, ["--task", "retrieval", "--model", ckpts("ret"), "--images-dir", str(images),
                                   "--annotations", str(missing)], capsys,
               r"1 image file\(s\) of the annotations not found .*sub/gone.jpg")
