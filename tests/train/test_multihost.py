"""Multi-host on localhost: two processes of two CPU devices each (jax.distributed, gloo) form one
4-device mesh; the stage-1 step agrees with one process of four devices, and the training loop
(per-process data shards, orbax checkpoints from both processes, resume) runs to the end."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from bounds import assert_close

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(tmp_path, nproc, mode):
  """Starts `nproc` worker processes (one jax.distributed job); returns a function that waits
  for them and gives their results and logs."""
  port = str(_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # processes share a compilation cache: the loop's resumed run loads its step instead of recompiling
  env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  procs, outs, logs = [], [], []
  for pid in range(nproc):
    out = tmp_path / f"{mode}_{nproc}_{pid}.json"
    outs.append(out)
    logs.append(tmp_path / f"{mode}_{nproc}_{pid}.log")  # files, not pipes: a full pipe would stall a peer
    with open(logs[-1], "w") as log:
      procs.append(subprocess.Popen([sys.executable, WORKER, str(out), str(pid), str(nproc), port, mode],
                                    env=env, stdout=log, stderr=subprocess.STDOUT))

  def wait():
    for p in procs:
      try:
        p.wait(timeout=600)
      except subprocess.TimeoutExpired:
        for q in procs:
          q.kill()
        raise
    logs_text = [f.read_text() for f in logs]
    for p, log in zip(procs, logs_text):
      assert p.returncode == 0, log[-4000:]
    return [json.loads(o.read_text()) for o in outs], logs_text
  return wait


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One process of 4 devices (the step) and, at the same time, two processes of 2 devices
  (the step, then the training loop with a resume): one start-up each instead of three."""
  tmp = tmp_path_factory.mktemp("multihost")
  single, multi = _launch(tmp, 1, "step"), _launch(tmp, 2, "both")
  return single(), multi(), tmp


def test_two_processes_equal_one(runs):
  ((single,), _), (multi, _), _ = runs
  assert single["devices"] == 4 and [m["process_count"] for m in multi] == [2, 2]
  for m in multi:
    assert m["devices"] == 4
    assert_close(m["step"]["losses"], single["step"]["losses"], "losses")
    assert_close(m["step"]["params"], single["step"]["params"], "params")  # measured 1.8e-7 (SGD, two steps)


def test_two_process_training_loop_with_resume(runs):
  _, (multi, logs), tmp = runs
  for m in multi:
    assert m["loop"]["last"]["step"] == 4 and np.isfinite(m["loop"]["last"]["loss"])
  assert "resumed from" in logs[0]
  assert sorted(os.listdir(tmp / "loopdir" / "checkpoints"))
