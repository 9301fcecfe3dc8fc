"""The trained model as a Hugging Face directory: the final export (WORKDIR/hf) and the best one by
an eval metric (WORKDIR/best, with best.json), each written to a temporary directory and renamed."""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np

from blip2_jax.checkpoints import hf
from blip2_jax.train import optim
from blip2_jax.train.reporting import print0


def export(st, state, path: str, *, quiet: bool = False) -> None:
  """The trained parameters as a HF directory (+ qformer_lm_head.safetensors, tokenizers)."""
  tree = jax.device_get(optim.merge(state.trainable, state.frozen))
  hf.save_pretrained(st.model, tree["model"], path)
  if "qformer_lm_head" in tree:
    hf.save_qformer_head(path, st.model, tree["qformer_lm_head"], tree.get("temp"))
  if st.llm_tokenizer is not None:
    st.llm_tokenizer.save_pretrained(path)
  if st.qformer_tokenizer is not None:
    st.qformer_tokenizer.save_pretrained(path if st.llm_tokenizer is None else os.path.join(path, "qformer_tokenizer"))
  if not quiet:
    print0(f"exported the trained model to {path}")


class Best:
  """The best `metric` seen so far and its export (WORKDIR/best); state in best.json, so a resumed run
  keeps competing against the earlier best."""

  def __init__(self, directory: str, metric: str):
    self.directory, self.metric = directory, metric
    self.value, self.step, self.baseline = None, None, None
    info = os.path.join(directory, "best.json")
    if metric and os.path.isfile(info):
      with open(info) as f:
        d = json.load(f)
      if d.get("metric") == metric:
        self.value, self.step, self.baseline = d.get("value"), d.get("step"), d.get("baseline")

  def update(self, step: int, metrics: dict, save) -> bool:
    """Exports with `save(path)` when metrics[metric] beats the best so far (ties keep the earlier)."""
    v = metrics.get(self.metric)
    if not self.metric or v is None or not np.isfinite(v) or (self.value is not None and v <= self.value):
      return False
    tmp = self.directory.rstrip("/") + ".tmp"
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
    save(tmp)
    with open(os.path.join(tmp, "best.json"), "w") as f:
      json.dump(dict(metric=self.metric, value=float(v), step=int(step), baseline=self.baseline), f)
    if os.path.isdir(self.directory):
      shutil.rmtree(self.directory)
    os.replace(tmp, self.directory)
    self.value, self.step = float(v), int(step)
    return True
