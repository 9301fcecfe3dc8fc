"""Every recipe in configs/ in its `tiny` form: real training steps on synthetic scenes with the
loss falling, checkpoints, a bit-exact resume (also onto another mesh), a run that survives a
half-written checkpoint, a NaN stop, and the exported HF directory loading back."""
import importlib
import json
import os

import numpy as np
import pytest

from blip2_jax.train import loop

RECIPES = ["stage1", "stage2", "caption_ft", "retrieval_ft", "instruct"]


def _config(name, arg="tiny", **over):
  c = importlib.import_module(f"configs.{name}").get_config(arg)
  for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _losses(workdir):
  return [x for x in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "loss" in x]


@pytest.mark.parametrize("name,arg", [(r, "tiny") for r in RECIPES] + [("stage2", "llm=flant5xl,tiny")])
def test_tiny_recipe_trains_and_loss_falls(tmp_path, name, arg):
  c = _config(name, arg, log_every=1)
  last = loop.train(c, str(tmp_path))
  assert last["step"] == c.total_steps
  lines = _losses(tmp_path)
  assert [x["step"] for x in lines] == list(range(1, c.total_steps + 1))
  loss = np.array([x["loss"] for x in lines])
  assert np.isfinite(loss).all()
  assert loss[-5:].mean() < 0.97 * loss[:5].mean(), loss  # it learns (the 64 scenes repeat)
  assert {"lr", "grad_norm", "images_per_s"} <= set(lines[-1])
  assert os.listdir(tmp_path / "checkpoints") and os.listdir(tmp_path / "tb")
  import blip2_jax
  model, params = blip2_jax.from_pretrained(str(tmp_path / "hf"))
  assert model.config.architecture == c.model.architecture


def test_config_errors():
  from configs import common, stage1
  with pytest.raises(ValueError, match="unknown config argument 'vitt'"):
    stage1.get_config("vitt=g")
  with pytest.raises(ValueError, match="vit='h'"):
    stage1.get_config("vit=h")
  with pytest.raises(ValueError, match="needs a value"):
    common.parse_arg("vit", vit="g", tiny=False)


def _files(d):
  return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d)) if f.endswith(".safetensors")}


def test_resume_is_bit_exact(tmp_path):
  """6 steps straight == 3 steps, stop, resume for 3: identical exported weights (stage 1: dropout,
  hard-negative sampling and the data order all resume exactly)."""
  c = _config("stage1", total_steps=6, checkpoint_every=100, log_every=1)
  loop.train(c, str(tmp_path / "full"))
  loop.train(c, str(tmp_path / "split"), max_steps=3)
  assert not os.path.exists(tmp_path / "split" / "hf")
  loop.train(c, str(tmp_path / "split"))
  a, b = _files(tmp_path / "full" / "hf"), _files(tmp_path / "split" / "hf")
  assert set(a) == {"model.safetensors", "qformer_lm_head.safetensors"} and a == b
  assert [x["loss"] for x in _losses(tmp_path / "split")] == [x["loss"] for x in _losses(tmp_path / "full")]


def test_resume_onto_another_mesh_and_past_a_broken_save(tmp_path):
  c = _config("stage2", total_steps=4, checkpoint_every=100, log_every=1, export_hf=False, mesh=(2, 2, 2))
  loop.train(c, str(tmp_path), max_steps=2)
  # a save killed half-way leaves a temporary directory; resuming must ignore it
  junk = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
  junk.mkdir()
  (junk / "garbage").write_text("partial")
  c.mesh = (8, 1, 1)
  last = loop.train(c, str(tmp_path))
  assert last["step"] == 4 and np.isfinite(last["loss"])
  assert [x["step"] for x in _losses(tmp_path)] == [1, 2, 3, 4]


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path):
  c = _config("stage2", total_steps=20, checkpoint_every=2, export_hf=False)
  c.optim.lr = 1e6  # diverges within a few steps
  c.optim.clip_norm = 0.0
  with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step \d+.*last good checkpoint is .*checkpoints/\d+"):
    loop.train(c, str(tmp_path))


def test_batch_that_does_not_split_over_the_mesh_is_refused(tmp_path):
  from blip2_jax.train import loop
  from configs import stage1
  c = stage1.get_config("tiny")
  c.global_batch_size = 4  # 8 CPU devices in tests
  with pytest.raises(ValueError, match="global_batch_size 4 does not split evenly over the 8 data-parallel devices"):
    loop.train(c, str(tmp_path))
