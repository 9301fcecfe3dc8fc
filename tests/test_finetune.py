"""python -m blip2_jax.finetune on tiny checkpoints and generated scenes: each task's validation metric
improves over the starting model, the best epoch is exported as a HF directory, a bad annotation file
is refused with a report naming its lines, --set is checked, and the ViT's layer-wise lr decay scales
each block's update by 0.95 ** (L - i), scanned or not."""
import functools
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip2_jax.checkpoints import tiny
from blip2_jax.cli import finetune
from blip2_jax.data import synthetic
from blip2_jax.train import batches, losses, optim, tasks

# A random tiny LLM knows no language to keep frozen, so everything trains (frozen=) at a high lr without
# warmup, with the VQA recipe's AdamW b2 and layer-wise decay for every task: tasks on the same
# checkpoint then compile to the same train step, which the session's compilation cache (conftest)
# serves the second time. One checkpoint save, at the end.
FAST = ["model.image_size=28", "global_batch_size=8", "num_epochs=3", "optim.lr=1e-2", "optim.warmup_steps=0",
        "frozen=", "optim.layer_decay=0.95", "optim.b2=0.999", "data.max_txt_len=16", "model.dtype=float32",
        "model.frozen_dtype=float32", "model.remat=none", "eval.num_beams=1", "eval.max_new_tokens=5",
        "eval.batch_size=16", "checkpoint_every=1000"]
METRIC = {"caption": "eval/cider", "vqa": "eval/vqa_acc", "instruct": "eval/exact_match"}
# VQA on InstructBLIP: the question also enters the Q-Former (test_vqa_batches_prefix_lm covers BLIP-2,
# where it reaches the LLM only); VQA and instructions then share one compiled train step.
ARCH = {"caption": "Blip2ForConditionalGeneration", "vqa": "InstructBlipForConditionalGeneration",
        "instruct": "InstructBlipForConditionalGeneration"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("finetune")
  ckpts = {a: tiny.save_tiny(str(root / a), a, "opt") for a in set(ARCH.values())}
  data = {}
  for task in ARCH:
    data[task] = (synthetic.write_shapes_dataset(str(root / "data"), f"{task}_train", task, 64, seed=0),
                  synthetic.write_shapes_dataset(str(root / "data"), f"{task}_val", task, 16, seed=1))
  return root, ckpts, data


def _args(env, task, workdir, *extra, model=None):
  root, ckpts, data = env
  train, val = data[task]
  a = ["--model", model or ckpts[ARCH[task]], "--task", task, "--train", train, "--val", val,
       "--images-dir", str(root / "data" / "images"), "--workdir", str(workdir)]
  for s in FAST + list(extra):
    a += ["--set", s]
  return a


def _evals(workdir):
  return [x for x in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if any("eval/" in k for k in x)]


@pytest.mark.parametrize("task", ["caption", "vqa", "instruct"])
def test_finetune_improves_the_validation_metric(env, tmp_path, task, capsys):
  assert finetune.main(_args(env, task, tmp_path)) == 0
  out = capsys.readouterr().out
  evals = _evals(tmp_path)
  metric = METRIC[task]
  assert [e["step"] for e in evals] == [0, 8, 16, 24]  # before training, then once per epoch (8 steps)
  values = [e[metric] for e in evals]
  print(f"{task} {metric} per epoch: {values}")
  assert max(values[1:]) > values[0], values  # it learns: better than the starting model
  best = json.load(open(tmp_path / "best" / "best.json"))
  assert best["metric"] == metric and best["value"] == max(values[1:]) and best["baseline"] == values[0]
  assert best["step"] == evals[1 + int(np.argmax(values[1:]))]["step"]  # the first epoch reaching the best
  assert f"best {metric}" in out
  if task != "caption":
    assert "goes to the Q-Former and the LLM" in out
  # WORKDIR/best and WORKDIR/hf load in transformers (and so in blip2_jax)
  import transformers
  cls = getattr(transformers, ARCH[task])
  for d in ("best", "hf"):
    assert isinstance(cls.from_pretrained(str(tmp_path / d)), cls)
  if ARCH[task].startswith("InstructBlip"):
    assert os.path.isdir(tmp_path / "best" / "qformer_tokenizer")
  if task == "caption":  # the same workdir under another learning rate: refused before anything loads
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    assert finetune.main(_args(env, task, tmp_path, "optim.lr=0.5")) == 2
    err = capsys.readouterr().err
    assert "holds a run started with another config (optim.lr: " in err and "--allow-config-change optim.lr" in err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_bad_annotations_are_reported_before_any_compute(env, tmp_path, capsys, monkeypatch):
  root, _, data = env
  lines = [
      {"image": "vqa_train_0.png", "question": "what color ?", "answers": ["red"]},     # 1 fine
      {"image": "missing.png", "question": "what color ?", "answers": ["red"]},         # 2 missing file
      {"image": "vqa_train_1.png", "question": "  ", "answers": ["red"]},                # 3 empty text
      {"image": "vqa_train_2.png", "question": "what ?", "answer": "red"},               # 4 unknown key, no answers
      {"image": "vqa_train_3.png", "caption": "two red circles"},                         # 5 wrong kind for vqa
      {"image": "vqa_train_4.png", "question": "q ?", "answers": ["a"], "caption": "c"},  # 6 two kinds
  ]
  bad = tmp_path / "bad.jsonl"
  bad.write_text("".join(json.dumps(r) + "\n" for r in lines) + "{oops\n")  # 7 not JSON
  from blip2_jax.train import loop

  def no_training(*a, **k):
    raise AssertionError("training started on a bad file")
  monkeypatch.setattr(loop, "train", no_training)
  args = _args(env, "vqa", tmp_path / "w")
  args[args.index("--train") + 1] = str(bad)
  assert finetune.main(args) == 2
  err = capsys.readouterr().err
  report = {}
  for line in err.splitlines():
    if line.startswith(f"  {bad}:"):
      n = int(line[len(f"  {bad}:"):].split(":")[0])
      report[n] = report.get(n, "") + line
  assert sorted(report) == [2, 3, 4, 5, 6, 7], err
  assert "image file not found" in report[2] and "missing.png" in report[2]
  assert 'empty text in "question"' in report[3]
  assert "answer (did you mean 'answers'?)" in err and 'vqa record without "answers"' in err
  assert "a caption record, but this task takes vqa records" in report[5]
  assert "mixes the fields of caption and vqa records" in report[6]
  assert "invalid JSON" in report[7]
  assert not os.path.exists(tmp_path / "w")
  # the same file is fine for nothing else either: a missing images dir is named
  args[args.index("--images-dir") + 1] = str(tmp_path / "nowhere")
  assert finetune.main(args) == 2 and "nowhere" in capsys.readouterr().err


def test_overrides_defaults_and_mismatches(env, tmp_path, capsys):
  root, ckpts, data = env
  # unknown keys and bad values name themselves
  assert finetune.main(_args(env, "vqa", tmp_path, "optim.lrr=1") + ["--print-config"]) == 2
  assert "--set optim.lrr=1: the config has no field 'optim.lrr' (did you mean 'optim.lr'?)" in capsys.readouterr().err
  assert finetune.main(_args(env, "vqa", tmp_path, "num_epochs=two") + ["--print-config"]) == 2
  assert "expected an integer" in capsys.readouterr().err
  assert finetune.main(_args(env, "vqa", tmp_path, "optim=1") + ["--print-config"]) == 2
  assert "is a group" in capsys.readouterr().err
  # the recipes' defaults (the batch aside: 64 records)
  ns = finetune.parser().parse_args(_args(env, "vqa", tmp_path)[:12])
  ns.images_dir = str(root / "data" / "images")
  for task, size, decay, frozen in [("caption", 364, 1.0, ["model/language_model/.*"]),
                                    ("vqa", 490, 0.95, ["model/language_model/.*"])]:
    ns.task, ns.train, ns.val, ns.set = task, *data[task], ["global_batch_size=8"]
    c, per_epoch, steps = finetune.build_config(ns, finetune.inspect_checkpoint(ckpts[ARCH[task]]))
    assert (c.optim.lr, c.model.image_size, c.optim.layer_decay, list(c.frozen)) == (1e-5, size, decay, frozen)
    assert c.num_epochs == 5 and c.eval.num_beams == 5 and c.best_metric == METRIC[task] and c.eval_at_start
  ns.task, ns.train, ns.val, ns.set = "instruct", *data["instruct"], ["global_batch_size=8", "mesh=1,8,1"]
  c, per_epoch, steps = finetune.build_config(ns, finetune.inspect_checkpoint(ckpts[ARCH["instruct"]]))
  assert c.model.image_size == 28 and c.tokenizer.qformer.endswith("qformer_tokenizer") and c.data.max_txt_len == 128
  assert set(c.frozen) == {"model/vision_model/.*", "model/language_model/.*"} and tuple(c.mesh) == (1, 8, 1)
  assert (per_epoch, steps, c.eval_every, c.optim.warmup_steps) == (8, 40, 8, 4)  # warmup <= a tenth of the run
  # a retrieval checkpoint has no LLM
  itm = tiny.save_tiny(str(tmp_path / "itm"), "Blip2ForImageTextRetrieval")
  assert finetune.main(_args(env, "caption", tmp_path, model=itm)) == 2
  assert "has no language model" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# batches




def _fake_setup(family, instruct):
  text = types.SimpleNamespace(eos_token_id=tiny.tiny_text_config(family).eos_token_id)
  cfg = types.SimpleNamespace(family=family, instruct=instruct, text=text)
  return types.SimpleNamespace(model=types.SimpleNamespace(config=cfg), llm_tokenizer=tiny.tiny_tokenizer(family),
                               qformer_tokenizer=tiny.tiny_tokenizer("bert") if instruct else None)


def _vqa_config():
  import ml_collections
  return ml_collections.ConfigDict(dict(task="vqa", data=dict(max_txt_len=16), loss=dict(vqa_prompt="")))


@pytest.mark.parametrize("family,instruct", [("opt", False), ("opt", True), ("t5", False)])
def test_vqa_batches_prefix_lm(family, instruct):
  st = _fake_setup(family, instruct)
  tok = st.llm_tokenizer
  fn = batches.make_batch_fn(_vqa_config(), st)
  b = fn({"image": np.zeros((2, 28, 28, 3), np.float32), "question": ["what color ?", "how many ?"],
          "answer": ["red", "two"]}, np.random.default_rng(0))
  assert b["input_ids"].shape == b["labels"].shape == (2, 16)
  prompt = "Question: what color ? " + ("Short answer:" if family == "t5" else "Answer:")
  if family == "t5":  # prompt to the encoder, the answer (+ </s>) as the decoder target
    assert tok.decode(b["input_ids"][0][b["attention_mask"][0] == 1], skip_special_tokens=True) == \
        tok.decode(tok(prompt)["input_ids"], skip_special_tokens=True)
    assert list(b["labels"][0][b["decoder_attention_mask"][0] == 1]) == tok("red")["input_ids"]
  else:  # [BOS prompt answer EOS], loss on "answer EOS" only
    row = list(b["input_ids"][0][b["attention_mask"][0] == 1])
    head = tok(prompt)["input_ids"]
    assert row == head + tok(" red", add_special_tokens=False)["input_ids"] + [st.model.config.text.eos_token_id]
    lab = b["labels"][0]
    assert (lab[:len(head)] == losses.IGNORE).all() and list(lab[len(head):len(row)]) == row[len(head):]
    assert (lab[len(row):] == losses.IGNORE).all()
  if instruct:  # InstructBLIP: the same prompt enters the Q-Former
    q = b["qformer_input_ids"][0][b["qformer_attention_mask"][0] == 1]
    assert list(q) == st.qformer_tokenizer(prompt)["input_ids"]
  else:
    assert "qformer_input_ids" not in b


def test_vqa_answers_follow_annotator_frequency():
  rec = {"question": "q", "answers": ["red"] * 6 + ["crimson"] * 3 + ["blue"]}
  rng = np.random.default_rng(0)
  draws = [tasks.vqa_fields(rec, rng)["answer"] for _ in range(4000)]
  freq = {a: draws.count(a) / len(draws) for a in ("red", "crimson", "blue")}
  assert freq == pytest.approx({"red": 0.6, "crimson": 0.3, "blue": 0.1}, abs=0.03)
  assert tasks.vqa_fields(rec, None)["answer"] == "red"  # eval: the most frequent


# ----------------------------------------------------------------------------------------
# layer-wise lr decay


@functools.lru_cache(maxsize=None)
def _vit_tree(scan: bool, layers: int = 3):
  import flax.linen as nn

  from blip2_jax.models import vit
  cfg = vit.VisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=layers, num_attention_heads=2,
                         image_size=28, patch_size=14, scan=scan)
  px = jnp.zeros((1, 28, 28, 3))
  shapes = nn.unbox(jax.eval_shape(vit.VisionModel(cfg).init, jax.random.PRNGKey(0), px)["params"])
  ones = jax.tree.map(lambda s: jnp.ones(s.shape, jnp.float32), shapes)
  return {"model": {"vision_model": ones, "qformer": {"w": jnp.ones((4, 4))}}}


@pytest.mark.parametrize("scan", [True, False])
def test_layer_decay_scales_each_vit_block(scan):
  """One AdamW step on all-ones gradients moves every weight by lr (m / sqrt(v) = 1); with layer
  decay 0.95 block i of L moves by lr * 0.95 ** (L - i), the embeddings by 0.95 ** (L + 1), the
  post-layernorm and everything outside the ViT by lr."""
  L, lr, d = 3, 0.1, 0.95
  tree = _vit_tree(scan, L)
  tx = optim.make_optimizer(lr=lr, weight_decay=0.0, clip_norm=None, layer_decay=d, vit_layers=L)
  upd, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, tree), tx.init(tree), tree)
  v = upd["model"]["vision_model"]
  enc = v["encoder"]
  for i in range(L):
    block = jax.tree.map(lambda x: x[i], enc["layers"]) if scan else enc[f"layers_{i}"]
    for x in jax.tree.leaves(block):
      np.testing.assert_allclose(np.abs(np.asarray(x)), lr * d ** (L - i), rtol=1e-5)
  for x in jax.tree.leaves(v["embeddings"]):
    np.testing.assert_allclose(np.abs(np.asarray(x)), lr * d ** (L + 1), rtol=1e-5)
  for x in jax.tree.leaves(v["post_layernorm"]) + [upd["model"]["qformer"]["w"]]:
    np.testing.assert_allclose(np.abs(np.asarray(x)), lr, rtol=1e-5)
  # weight decay scales with the layer's lr too (torch param-group semantics): a decayed kernel
  tx = optim.make_optimizer(lr=lr, weight_decay=0.5, clip_norm=None, layer_decay=d, vit_layers=L)
  upd, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, tree), tx.init(tree), tree)
  k = upd["model"]["vision_model"]["encoder"]
  k = k["layers"]["mlp"]["fc1"]["kernel"][0] if scan else k["layers_0"]["mlp"]["fc1"]["kernel"]
  np.testing.assert_allclose(np.asarray(k), -lr * 0.5 * d ** L, rtol=1e-5)
  with pytest.raises(ValueError, match="needs vit_layers"):
    optim.make_optimizer(lr=lr, layer_decay=d)


def test_layer_decay_scanned_equals_unrolled():
  """The same random gradients through an AdamW step (decay 0.9): the scanned stack's layer i equals layers_i."""
  L = 3
  a, b = _vit_tree(True, L), _vit_tree(False, L)
  rng = np.random.default_rng(0)
  ga = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), a)
  gb = jax.tree.map(lambda x: x, b)  # new containers: the cached tree stays as it is
  gb["model"]["vision_model"] = dict(b["model"]["vision_model"], encoder={
      f"layers_{i}": jax.tree.map(lambda x: x[i], ga["model"]["vision_model"]["encoder"]["layers"]) for i in range(L)})
  for k in ("embeddings", "post_layernorm"):
    gb["model"]["vision_model"][k] = ga["model"]["vision_model"][k]
  gb["model"]["qformer"] = ga["model"]["qformer"]
  tx = optim.make_optimizer(lr=0.1, layer_decay=0.9, vit_layers=L, clip_norm=None)
  ua, _ = jax.jit(tx.update)(ga, tx.init(a), a)
  ub, _ = jax.jit(tx.update)(gb, tx.init(b), b)
  for i in range(L):
    ea = jax.tree.map(lambda x: x[i], ua["model"]["vision_model"]["encoder"]["layers"])
    eb = ub["model"]["vision_model"]["encoder"][f"layers_{i}"]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6), ea, eb)
