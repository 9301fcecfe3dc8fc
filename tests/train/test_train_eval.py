"""Evaluation inside training (blip2_jax.train.evaluate) on the tiny stage-1 and stage-2 recipes:
metrics agree with the inference / evaluation functions called directly, sharded bf16 training
trees work, and the exact-match metric moves when the references do."""
import importlib

import jax
import ml_collections
import numpy as np
import optax
import pytest

from blip2_jax import evaluation, inference
from blip2_jax.train import evaluate as ev
from blip2_jax.train import optim
from blip2_jax.train import setup as setup_lib
from blip2_jax.train import step as step_lib

EVAL = dict(num_records=6, batch_size=4, max_new_tokens=6, num_beams=1, k=3, num_examples=3)


def _config(name, arg="tiny"):
  c = importlib.import_module(f"configs.{name}").get_config(arg)
  c.eval = ml_collections.ConfigDict(EVAL)  # 6 images in batches of 4: the last one is padded
  return c


@pytest.fixture(scope="module")
def stage1():
  c = _config("stage1")
  st = setup_lib.build(c)
  return c, st, ev.make_eval_set(c, st)


@pytest.fixture(scope="module")
def stage2():
  c = _config("stage2")
  st = setup_lib.build(c)
  return c, st, ev.make_eval_set(c, st)


def test_recall_at_matches_retrieval_recall():
  rng = np.random.default_rng(0)
  sim = rng.normal(size=(7, 14))
  txt2img, img2txt = evaluation.coco_style_maps([2] * 7)
  ref = evaluation.retrieval_recall(sim, txt2img, img2txt, ks=(1, 5))
  assert ev.recall_at(sim, img2txt) == {1: ref["txt_r1"], 5: ref["txt_r5"]}
  assert ev.recall_at(sim.T, [[i] for i in txt2img]) == {1: ref["img_r1"], 5: ref["img_r5"]}
  # a duplicate caption: either image counts as found for it
  sim = np.array([[0.9, 0.1], [0.8, 0.2]])
  assert ev.recall_at(sim.T, [[0, 1], [0, 1]], ks=(1,))[1] == 100.0
  assert ev.recall_at(sim.T, [[1], [0]], ks=(1,))[1] == 0.0


def test_shapes_eval_set(stage1):
  c, st, es = stage1
  assert len(es) == 6 and es.pixel_values.shape == (6, c.model.image_size, c.model.image_size, 3)
  assert es.pixel_values.dtype == np.float32
  from blip2_jax.data import synthetic
  held_out = {f"{col} {shape}" for col, shape in synthetic.HELD_OUT}
  for refs in es.references:  # held-out (colour, shape) combinations only
    assert len(refs) == 1 and any(h in refs[0] for h in held_out), refs
  assert len(set(es.texts)) == len(es.texts) and es.input_ids.shape == (len(es.texts), c.data.max_txt_len)
  for i, row in enumerate(es.img2txt):
    assert all(i in es.txt2img[t] for t in row)
  # no eval data configured -> None (evaluation skipped)
  c2 = _config("stage1")
  c2.data.source = "annotations"
  assert ev.make_eval_set(c2, st) is None


def test_stage1_metrics_match_direct_computation(stage1):
  c, st, es = stage1
  res = ev.evaluate(c, st, st.params, es)
  scalars = {k: v for k, v in res.items() if k != "eval/examples"}
  assert all(isinstance(v, float) and np.isfinite(v) for v in scalars.values()), scalars
  for k in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean", "itc_txt_r1", "itc_img_r1"):
    assert 0.0 <= res[f"eval/{k}"] <= 100.0
  s = inference.retrieval_scores(st.model, st.params["model"], es.pixel_values, es.input_ids, es.attention_mask,
                                 k=EVAL["k"], batch_size=EVAL["batch_size"])

  def r_at(sim, pos, k):  # independent: best correct item's rank among the wrong ones
    hits = [np.sum(np.delete(row, p) >= row[p].max()) < k for row, p in zip(np.asarray(sim), pos)]
    return 100.0 * np.mean(hits)
  assert res["eval/txt_r1"] == pytest.approx(r_at(s["i2t"], es.img2txt, 1))
  assert res["eval/txt_r5"] == pytest.approx(r_at(s["i2t"], es.img2txt, 5))
  assert res["eval/img_r1"] == pytest.approx(r_at(s["t2i"], es.txt2img, 1))
  assert res["eval/itc_img_r1"] == pytest.approx(r_at(s["itc"].T, es.txt2img, 1))
  ex = res["eval/examples"]
  assert len(ex) == 3 and all(isinstance(r, str) and isinstance(p, str) for r, p in ex)
  assert [r for r, _ in ex] == [refs[0] for refs in es.references[:3]]
  direct = inference.caption(st.model, st.params["model"], st.qformer_tokenizer, es.pixel_values[:3],
                             qformer_lm_head=st.params["qformer_lm_head"], prompt="", num_beams=1,
                             max_new_tokens=EVAL["max_new_tokens"], min_new_tokens=0)
  assert [p for _, p in ex] == direct


def test_stage1_score_orientation(stage1, monkeypatch):
  """Designed scores through evaluate: i2t ranks every image's caption first, t2i ranks every text's
  image last, ITC is constant (ties count against): txt 100, img 0 (unless only one image), ITC 0."""
  c, st, es = stage1
  n_img, n_txt = len(es), len(es.texts)
  i2t = np.zeros((n_img, n_txt), np.float32)
  t2i = np.ones((n_txt, n_img), np.float32)
  for i, row in enumerate(es.img2txt):
    i2t[i, row] = 1.0
    t2i[row, i] = 0.0

  def fake(model, params, px, ids, mask, **kw):
    assert px.shape[0] == n_img and ids.shape[0] == n_txt
    return {"itc": np.zeros((n_img, n_txt), np.float32), "i2t": i2t, "t2i": t2i}
  monkeypatch.setattr(inference, "retrieval_scores", fake)
  c = _config("stage1")
  c.eval.num_examples = 0
  res = ev.evaluate(c, st, st.params, es)
  assert res["eval/txt_r1"] == 100.0 and res["eval/img_r1"] == 0.0 and res["eval/itc_txt_r1"] == 0.0
  assert "eval/examples" not in res


def test_sharded_bf16_training_tree(stage1):
  """The loop's tree: frozen ViT in bfloat16, everything placed on a (2, 2, 2) mesh."""
  c, st, es = stage1
  from blip2_jax.core import sharding as shd
  mesh = shd.make_mesh((2, 2, 2))
  params = jax.tree.map(lambda x: x, st.params)  # init_train_state may reuse buffers
  state = step_lib.init_train_state(params, list(c.frozen), optax.adamw(1e-3), frozen_dtype="bfloat16",
                                    shardings=step_lib.tree_shardings(st.model, params, mesh))
  tree = optim.merge(state.trainable, state.frozen)
  leaves = jax.tree.leaves(tree["model"]["vision_model"])
  assert {x.dtype for x in leaves} == {np.dtype("bfloat16")}
  assert any(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(tree))
  res = ev.evaluate(c, st, tree, es)
  assert all(np.isfinite(v) and 0 <= v <= 100 for k, v in res.items() if "_r" in k)
  assert all(isinstance(p, str) for _, p in res["eval/examples"])


def test_stage2_captions_match_direct_and_exact_match_moves(stage2):
  c, st, es = stage2
  res = ev.evaluate(c, st, st.params, es)
  for k in ("eval/caption_exact", "eval/bleu4", "eval/cider", "eval/num_images"):
    assert isinstance(res[k], float) and np.isfinite(res[k]), (k, res[k])
  assert 0.0 <= res["eval/caption_exact"] <= 100.0 and 0.0 <= res["eval/bleu4"] <= 1.0 and res["eval/cider"] >= 0
  preds = inference.caption(st.model, st.params["model"], st.llm_tokenizer, es.pixel_values, prompt=c.loss.prompt,
                            batch_size=EVAL["batch_size"], num_beams=1, max_new_tokens=EVAL["max_new_tokens"],
                            min_new_tokens=0)
  assert all(isinstance(p, str) for p in preds)
  assert res["eval/examples"] == [(es.references[i][0], preds[i]) for i in range(3)]
  m = evaluation.evaluate_captions(preds, es.references)
  assert res["eval/cider"] == pytest.approx(m["CIDEr"]) and res["eval/bleu4"] == pytest.approx(m["Bleu_4"])
  # references equal to the predictions (up to case / punctuation): every caption is an exact match
  import dataclasses
  same = dataclasses.replace(es, references=[["x y", p.upper() + "."] for p in preds])
  assert ev.evaluate(c, st, st.params, same)["eval/caption_exact"] == 100.0
  other = dataclasses.replace(es, references=[[p + " zzz"] for p in preds])
  assert ev.evaluate(c, st, st.params, other)["eval/caption_exact"] == 0.0


def test_annotation_eval_set(tmp_path, stage2):
  """A LAVIS-style file: caption lists kept whole, one-caption records grouped by image, num_records
  images, an unreadable image left out."""
  import json

  from PIL import Image
  c, st, _ = stage2
  for i in range(3):
    Image.fromarray(np.full((20, 24, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
  (tmp_path / "bad.png").write_bytes(b"not an image")
  ann = [{"image": "0.png", "caption": ["a b", "c d"]}, {"image": "1.png", "caption": "e f"},
         {"image": "1.png", "caption": "g h"}, {"image": "bad.png", "caption": "x"},
         {"image": "2.png", "caption": "i j"}]
  (tmp_path / "ann.json").write_text(json.dumps(ann))
  c = _config("stage2")
  c.data.source = "annotations"
  c.data.eval_annotations = str(tmp_path / "ann.json")
  c.data.images_dir = str(tmp_path)
  c.eval.num_records = 3
  es = ev.make_eval_set(c, st)
  assert es.names == ["0.png", "1.png"] and es.references == [["a b", "c d"], ["e f", "g h"]]
  assert es.pixel_values.shape == (2, c.model.image_size, c.model.image_size, 3)
  assert es.img2txt == [[0, 1], [2, 3]] and es.input_ids is None
