"""Hugging Face Hub ids for from_pretrained and every --model (blip2_jax.core.hub), offline: a cache in
huggingface_hub's own layout (models--ORG--NAME/{blobs,snapshots/<commit>,refs/<name>}) is built from a
tiny saved checkpoint and read through the real library with HF_HUB_OFFLINE=1 (tests/conftest.py)."""
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import blip2_jax
from blip2_jax.checkpoints import tiny
from blip2_jax.cli import caption, options
from blip2_jax.core import hub
from blip2_jax.data import synthetic

REPO = "test-org/tiny-blip2"
MAIN, V1 = "a" * 40, "b" * 40  # commit hashes of two revisions


def add_to_cache(cache, repo_id: str, src: str, commit: str, refs=("main",)) -> str:
  """Puts the files of `src` into a huggingface_hub cache as `repo_id` at `commit` (content-addressed
  blobs, relative symlinks from the snapshot, refs naming the commit) -> the snapshot directory."""
  repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
  snapshot = os.path.join(repo, "snapshots", commit)
  for d, _, files in os.walk(src):
    for f in files:
      rel = os.path.relpath(os.path.join(d, f), src)
      with open(os.path.join(d, f), "rb") as fh:
        data = fh.read()
      blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
      os.makedirs(os.path.dirname(blob), exist_ok=True)
      with open(blob, "wb") as fh:
        fh.write(data)
      link = os.path.join(snapshot, rel)
      os.makedirs(os.path.dirname(link), exist_ok=True)
      os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
  for ref in refs:
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", ref), "w") as fh:
      fh.write(commit)
  return snapshot


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """HF_HOME-style root whose hub/ cache holds REPO: main = a tiny retrieval model, v1 = a tiny OPT one;
  and test-org/tiny-opt (main) for the fine-tuning command."""
  root = tmp_path_factory.mktemp("hf_home")
  src = tmp_path_factory.mktemp("src")
  tiny.save_tiny(str(src / "ret"), "Blip2ForImageTextRetrieval")
  tiny.save_tiny(str(src / "opt"), "Blip2ForConditionalGeneration", "opt")
  add_to_cache(root / "hub", REPO, str(src / "ret"), MAIN)
  add_to_cache(root / "hub", REPO, str(src / "opt"), V1, refs=("v1",))
  add_to_cache(root / "hub", "test-org/tiny-opt", str(src / "opt"), MAIN)
  return root


def _snapshot(cache, commit, repo=REPO):
  return str(cache / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / commit)


def test_offline_mode_is_on():
  assert hub.offline()  # tests/conftest.py: nothing here may reach the network


def test_resolve_revisions(cache):
  c = cache / "hub"
  assert hub.resolve(REPO, cache_dir=c) == _snapshot(cache, MAIN)
  assert hub.resolve(REPO, revision="v1", cache_dir=c) == _snapshot(cache, V1)
  assert hub.resolve(REPO, revision=V1, cache_dir=c) == _snapshot(cache, V1)  # a commit hash
  with pytest.raises(hub.HubError, match=r"hf download test-org/tiny-blip2 --revision v2"):
    hub.resolve(REPO, revision="v2", cache_dir=c)


def test_from_pretrained_loads_a_hub_id(cache):
  model, params = blip2_jax.from_pretrained(REPO, cache_dir=cache / "hub")
  assert model.config.architecture == "Blip2ForImageTextRetrieval"
  _, local = blip2_jax.from_pretrained(_snapshot(cache, MAIN))
  np.testing.assert_array_equal(params["query_tokens"], local["query_tokens"])
  model, _ = blip2_jax.from_pretrained(REPO, revision="v1", cache_dir=cache / "hub")
  assert model.config.architecture == "Blip2ForConditionalGeneration"


def test_local_directory_takes_precedence(cache, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shutil.copytree(_snapshot(cache, V1), tmp_path / REPO)  # ./test-org/tiny-blip2, spelled like the Hub id
  assert hub.resolve(REPO, cache_dir=cache / "hub") == REPO
  model, _ = blip2_jax.from_pretrained(REPO, cache_dir=cache / "hub")
  assert model.config.architecture == "Blip2ForConditionalGeneration"  # the local copy, not the cached main


def test_names_that_are_no_hub_id_are_left_to_the_caller(tmp_path):
  for name in (str(tmp_path / "missing"), "./missing", "runs/a/b", "a--b/c"):
    assert hub.resolve(name) == name  # reported as a missing directory, as before
  assert hub.is_hub_id("Salesforce/blip2-opt-2.7b") and hub.is_hub_id("bert-base-uncased")


def test_not_cached_offline_is_one_line_and_exit_2(tmp_path, capsys):
  img = tmp_path / "a.png"
  from PIL import Image
  Image.new("RGB", (8, 8)).save(img)
  code = caption.main(["--model", "test-org/not-cached", str(img)])
  err = capsys.readouterr().err.splitlines()
  assert code == 2 and len(err) == 1, err
  assert err[0].startswith("error: --model test-org/not-cached: no such local directory, and not in the Hugging "
                           "Face cache (")
  assert err[0].endswith("while HF_HUB_OFFLINE is set: fetch it first with `hf download test-org/not-cached` "
                         "(or unset HF_HUB_OFFLINE)")
  with pytest.raises(options.UsageError, match="--hf-dir test-org/not-cached: no such local directory"):
    options.model_dir("test-org/not-cached", "--hf-dir")


def test_cli_reads_hf_home(cache, tmp_path):
  """A command line, its own process: HF_HOME points at the cache, HF_HUB_OFFLINE=1; --model is a Hub id
  (fine-tuning, stopped at --print-config: the checkpoint is checked, nothing is compiled)."""
  synthetic.write_shapes_dataset(str(tmp_path / "data"), "train", "caption", 4)
  env = dict(os.environ, HF_HOME=str(cache), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # either would win over HF_HOME
    env.pop(name, None)
  data = tmp_path / "data"
  base = [sys.executable, "-m", "blip2_jax.finetune", "--task", "caption", "--train", str(data / "train.jsonl"),
          "--images-dir", str(data / "images"), "--workdir", str(tmp_path / "w"), "--set", "global_batch_size=2",
          "--print-config"]
  r = subprocess.run(base + ["--model", "test-org/tiny-opt"], capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr
  assert f"pretrained: {_snapshot(cache, MAIN, 'test-org/tiny-opt')}\n" in r.stdout
  r = subprocess.run(base + ["--model", REPO, "--revision", "v2"], capture_output=True, text=True, env=env,
                     timeout=300)
  assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
  assert f"not in the Hugging Face cache ({cache / 'hub'})" in r.stderr
  assert "`hf download test-org/tiny-blip2 --revision v2`" in r.stderr
  assert not os.path.exists(tmp_path / "w")
