"""Executes notebooks/blip2_jax_quickstart.ipynb headless on a tiny random checkpoint, so it never rots."""
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "blip2_jax_quickstart.ipynb")


def _stand_in_demo_run(directory) -> None:
  """summary.json and summary.png as `python -m blip2_jax.demo` writes them, with made-up numbers."""
  import json

  from blip2_jax.cli import demo
  keys = ("img->txt R@1", "txt->img R@1", "caption exact", "count", "color", "shape", "position")
  results = {f"stage{i}_{when}": {sp: dict.fromkeys(keys, 50.0) for sp in demo.SPLITS}
             for i in (1, 2) for when in ("before", "after")}
  results.update(eval_captions={sp: ["one red circle at the top left"] for sp in demo.SPLITS}, seconds=60.0)
  curves = {"stage1": [dict(step=1, loss=3.0, itc=1.0, itm=1.0, itg=1.0)], "stage2": [dict(step=1, loss=2.0)]}
  os.makedirs(directory)
  assert demo.save_figure(os.path.join(directory, "summary.png"), curves, results, dict.fromkeys(keys, 25.0))
  with open(os.path.join(directory, "summary.json"), "w") as f:
    json.dump(results, f)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("BLIP2_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("BLIP2_NOTEBOOK_WORKDIR", str(tmp_path))
  _stand_in_demo_run(tmp_path / "demo")
  monkeypatch.setenv("BLIP2_DEMO_DIR", str(tmp_path / "demo"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
  out = "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
  assert "scene:" in out and "photo:" in out and "Q: what color" in out
  assert "after fine-tuning:" in out and "demo figure:" in out
  # the three figures (the demo's, images with captions, the loss curve) were shown
  pngs = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(pngs) == 3
  # the fine-tuning run logged a loss for every step and exported a loadable directory
  assert os.path.exists(tmp_path / "finetune" / "hf" / "config.json")
  import json
  rows = [json.loads(l) for l in open(tmp_path / "finetune" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
