"""Every recipe in configs/ in its `tiny` form: a few real training steps on synthetic scenes, a
checkpoint, an exact resume, and the exported HF directory loading back."""
import importlib
import json
import os

import jax
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


@pytest.mark.parametrize("name,arg", [(r, "tiny") for r in RECIPES] + [("stage2", "llm=flant5xl,tiny")])
def test_tiny_recipe_trains(tmp_path, name, arg):
  c = _config(name, arg)
  last = loop.train(c, str(tmp_path))
  assert last["step"] == c.total_steps
  assert np.isfinite(last["loss"]) and last["loss"] > 0
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert [x["step"] for x in lines] == list(range(1, c.total_steps + 1))
  assert sorted(os.listdir(tmp_path / "checkpoints"))  # orbax step directories
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


def test_resume_is_exact(tmp_path):
  """4 steps at once == 2 steps, stop, resume for 2 (same batches, same params)."""
  c = _config("stage1", total_steps=4, checkpoint_every=100, export_hf=False)
  full = loop.train(c, str(tmp_path / "full"))
  loop.train(c, str(tmp_path / "split"), max_steps=2)
  assert os.listdir(tmp_path / "split" / "checkpoints")
  resumed = loop.train(c, str(tmp_path / "split"))
  assert resumed["step"] == 4
  for k in ("loss", "itc", "itm", "itg"):
    assert resumed[k] == pytest.approx(full[k], rel=1e-6, abs=1e-7), k
