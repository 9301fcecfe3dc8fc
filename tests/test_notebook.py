"""Executes notebooks/blip2_jax_quickstart.ipynb headless on a tiny random checkpoint, so it never rots."""
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "blip2_jax_quickstart.ipynb")


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("BLIP2_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("BLIP2_NOTEBOOK_WORKDIR", str(tmp_path))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
  out = "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
  assert "scene:" in out and "photo:" in out and "Q: what color" in out
  assert "after fine-tuning:" in out
  # both figures (images with captions, the loss curve) were drawn
  pngs = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(pngs) == 2
  # the fine-tuning run logged a loss for every step and exported a loadable directory
  assert os.path.exists(tmp_path / "finetune" / "hf" / "config.json")
  import json
  rows = [json.loads(l) for l in open(tmp_path / "finetune" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
