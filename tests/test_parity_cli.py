"""`python -m blip2_jax.parity`: exit status and report, in-process (fast) and as a subprocess."""
import math
import os
import subprocess
import sys

import pytest

from blip2_jax.checkpoints import hf as hfw
from blip2_jax.cli import parity

STAGES = ("vision", "qformer", "projection", "logits")


@pytest.fixture(scope="module")
def opt_dir(tiny_checkpoint):
  return tiny_checkpoint()


def _table(out):
  """{stage: max abs diff} parsed from the printed table."""
  rows = {}
  for line in out.splitlines():
    parts = line.split()
    if parts and parts[0] in STAGES + ("itc_logits_per_image", "itm_logits_per_image") and len(parts) >= 4:
      rows[parts[0]] = float(parts[1])
  return rows


def test_hf_dir_passes_and_threshold_zero_fails(opt_dir, capsys):
  assert parity.main(["--hf-dir", opt_dir]) == 0
  out = capsys.readouterr().out
  rows = _table(out)
  assert set(rows) == set(STAGES), out
  assert all(0 < v <= 1e-4 for v in rows.values()), rows  # nonzero: float32 round-off, measured <= 2.5e-6
  assert "OK: every stage within 0.0001 (float32)" in out
  assert parity.main(["--hf-dir", opt_dir, "--threshold", "0"]) == 1
  out = capsys.readouterr().out
  assert "FAIL above 0:" in out and out.count("<-- above threshold") == 4, out


def test_a_wrong_weight_is_caught_at_its_stage(opt_dir, capsys, monkeypatch):
  """A conversion bug in one weight (the projection bias) fails exactly the stages after it."""
  real = hfw.from_pretrained

  def broken(*a, **kw):
    model, params = real(*a, **kw)
    params = dict(params, language_projection=dict(params["language_projection"]))
    # one channel only: a uniform shift would vanish in OPT's LayerNorms
    params["language_projection"]["bias"] = params["language_projection"]["bias"].at[0].add(1e-2)
    return model, params
  monkeypatch.setattr(hfw, "from_pretrained", broken)
  assert parity.main(["--hf-dir", opt_dir]) == 1
  out = capsys.readouterr().out
  rows = _table(out)
  assert rows["vision"] < 1e-4 and rows["qformer"] < 1e-4
  assert rows["projection"] >= 0.99e-2 and rows["logits"] > 1e-4
  assert "FAIL above 0.0001" in out and "projection" in out.split("FAIL")[1]


def test_nan_stage_fails(opt_dir, capsys, monkeypatch):
  """NaN compares False with everything: it must fail, not slip through as 'within threshold'."""
  monkeypatch.setattr(parity, "compare", lambda *a, **k: [("vision", math.nan, math.nan, 1.0),
                                                          ("logits", 0.0, 0.0, 1.0)])
  assert parity.main(["--hf-dir", opt_dir]) == 1
  assert "FAIL above 0.0001: " in capsys.readouterr().out


def test_bfloat16_default_threshold(opt_dir, capsys):
  assert parity.main(["--hf-dir", opt_dir, "--dtype", "bfloat16"]) == 0
  out = capsys.readouterr().out
  rows = _table(out)
  assert set(rows) == set(STAGES) and max(rows.values()) < 0.08, out  # measured 4.7e-2 (test_blip2.py)
  assert "OK: every stage within 0.15 (bfloat16)" in out


def test_tiny_random_retrieval_in_process(capsys):
  assert parity.main(["--tiny-random", "retrieval"]) == 0
  out = capsys.readouterr().out
  assert "tiny random retrieval (Blip2ForImageTextRetrieval)" in out
  assert {"vision", "itc_logits_per_image", "itm_logits_per_image"} <= set(_table(out))


def test_bad_arguments(tmp_path, capsys):
  """Bad input: exit status 2 and one line, before anything loads (tests/test_cli_errors.py has the rest)."""
  assert parity.main([]) == 2  # one of --hf-dir / --tiny-random is required
  assert parity.main(["--tiny-random", "gpt2"]) == 2
  assert parity.main(["--hf-dir", str(tmp_path / "nope")]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 3 and "--hf-dir --tiny-random is required" in err[0] and "invalid choice: 'gpt2'" in err[1]
  assert err[2] == f"error: --hf-dir {tmp_path / 'nope'}: no such directory"


def test_entry_point_subprocess():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "blip2_jax.parity", "--tiny-random", "opt"], capture_output=True,
                     text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "tiny random opt (Blip2ForConditionalGeneration) [float32]" in r.stdout
  assert set(_table(r.stdout)) == set(STAGES), r.stdout
  assert "OK: every stage within" in r.stdout
