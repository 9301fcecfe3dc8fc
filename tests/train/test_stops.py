"""How a training run stops and resumes from the command line: SIGTERM (preemption) saves and exits
143 saying "preempted", Ctrl-C saves and exits 130, both in one line without a traceback; a resume
under another config is refused naming the keys (WORKDIR/config.json) unless they are allowed."""
import os
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from blip2_jax.cli import train as train_cli
from blip2_jax.train import run_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(REPO, "configs", "stage1.py") + ":tiny"


def _start(workdir, log):
  cmd = [sys.executable, "-m", "blip2_jax.train", "--config", RECIPE, "--workdir", str(workdir),
         "--config.total_steps=100000", "--config.log_every=1", "--config.checkpoint_every=100000"]
  out = open(log, "w")
  return subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(workdir)), out


def _wait_for_steps(log, proc, timeout=300):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    if os.path.exists(log) and "step 3/" in open(log).read():
      return
    time.sleep(0.5)
  raise AssertionError("no training step within the timeout")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """Two runs side by side (one compile each, in parallel): one stopped by SIGTERM, one by Ctrl-C."""
  tmp = tmp_path_factory.mktemp("stops")
  runs = {}
  for name in ("term", "int"):
    runs[name] = _start(tmp / name, tmp / f"{name}.log")
  for name, sig in (("term", signal.SIGTERM), ("int", signal.SIGINT)):
    proc, _ = runs[name]
    _wait_for_steps(tmp / f"{name}.log", proc)
    proc.send_signal(sig)
  out = {}
  for name, (proc, log) in runs.items():
    err = proc.communicate(timeout=300)[1]
    log.close()
    out[name] = (proc.returncode, err, tmp / name)
  return out


def _last_line(err):
  return [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]


@pytest.mark.parametrize("name,status,word", [("term", 143, "preempted (SIGTERM)"), ("int", 130, "interrupted (Ctrl-C)")])
def test_signal_saves_and_says_so(stopped, name, status, word):
  code, err, workdir = stopped[name]
  assert code == status, err[-2000:]
  assert "Traceback" not in err
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps and steps[-1] >= 3
  line = _last_line(err)
  assert line.startswith(f"{word} at step {steps[-1]}/100000: saved ") and line.endswith(
      "; rerun the same command to resume"), line
  assert (workdir / "config.json").exists()


def test_resume_under_another_config_is_refused(stopped, capsys):
  _, _, workdir = stopped["term"]
  before = sorted(os.listdir(workdir / "checkpoints"))
  argv = ["--config", RECIPE, "--workdir", str(workdir), "--config.total_steps=100000",
          "--config.optim.lr=0.01", "--config.global_batch_size=16"]
  assert train_cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"error: --workdir {workdir} holds a run started with another "
                                                 "config (global_batch_size: 8 -> 16; optim.lr: 0.002 -> 0.01)")
  assert err.rstrip().endswith("--allow-config-change global_batch_size,optim.lr")
  assert sorted(os.listdir(workdir / "checkpoints")) == before
  # another recipe: the task comes first, no suggestion to allow it
  other = os.path.join(REPO, "configs", "stage2.py") + ":tiny"
  assert train_cli.main(["--config", other, "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err
  assert "(task: 'stage1' -> 'stage2';" in err and "more): rerun with the same config or use a new --workdir" in err


def test_allowed_and_free_changes():
  saved = ml_collections.ConfigDict(dict(task="stage1", total_steps=10, log_every=5,
                                         optim=dict(lr=1e-4, b2=0.98), model=dict(pretrained="a")))
  now = ml_collections.ConfigDict(saved.to_dict())
  now.total_steps, now.log_every, now.model.pretrained = 20, 1, "/moved/a"  # only total_steps counts
  assert run_config.differences(saved.to_dict(), now.to_dict()) == ["total_steps: 10 -> 20"]
  assert run_config.differences(saved.to_dict(), now.to_dict(), allow=["total_steps"]) == []
  now.optim.lr = 1e-3
  assert run_config.differences(saved.to_dict(), now.to_dict(), allow=["optim"]) == ["total_steps: 10 -> 20"]


def test_allowed_resume_check(tmp_path):
  c = ml_collections.ConfigDict(dict(task="stage1", total_steps=10))
  run_config.write(str(tmp_path), c)
  c2 = ml_collections.ConfigDict(dict(task="stage1", total_steps=30))
  with pytest.raises(run_config.ConfigMismatch, match=r"total_steps: 10 -> 30"):
    run_config.check_resume(str(tmp_path), c2, resuming=True)
  run_config.check_resume(str(tmp_path), c2, ["total_steps"], resuming=True)
  run_config.check_resume(str(tmp_path), c2, ["all"], resuming=True)
  run_config.check_resume(str(tmp_path), c2, resuming=False)  # a fresh run: nothing to compare
  assert not run_config.has_checkpoint(str(tmp_path))
  (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)  # a save cut short
  assert not run_config.has_checkpoint(str(tmp_path))
  (tmp_path / "checkpoints" / "5").mkdir()
  assert run_config.has_checkpoint(str(tmp_path))
