"""`python -m blip2_jax.train` on bad input: one line on stderr, exit status 2, nothing created (no
workdir), before any model is built; a failure during training: one line, exit status 1, no empty
workdir left; --debug for the traceback; recipes by absolute path from another directory; the dashed
spellings of --max_steps / --num_processes / --process_id. Runs in-process through main(argv) with
loop.train replaced where a run would start: nothing here compiles."""
import importlib
import os

import pytest

from blip2_jax.cli import train as train_cli
from blip2_jax.core import sharding
from blip2_jax.train import loop, validate

from helpers import run_cli, usage_error

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
STAGE1 = os.path.join(CONFIGS, "stage1.py") + ":tiny"


@pytest.fixture
def runs(monkeypatch):
  """loop.train recorded instead of run: a list of (config, workdir, max_steps) per call."""
  calls = []
  monkeypatch.setattr(loop, "train", lambda config, workdir, max_steps=None, **kw: calls.append((config, workdir, max_steps)))
  return calls


def _run(argv, capsys):
  return run_cli(train_cli.main, argv, capsys)


def _usage_error(argv, capsys, *needles):
  return usage_error(train_cli.main, argv, capsys, *needles)


def test_recipe_by_absolute_path_from_another_directory(tmp_path, monkeypatch, runs, capsys):
  monkeypatch.chdir(tmp_path)
  code, _, err = _run(["--config", STAGE1, "--workdir", "w", "--config.total_steps=3", "--max-steps", "2"], capsys)
  assert code == 0, err
  [(config, workdir, max_steps)] = runs
  assert (config.task, config.total_steps, config.model.init, workdir, max_steps) == ("stage1", 3, "random", "w", 2)


def test_dashed_and_underscored_flags(tmp_path, monkeypatch, runs, capsys):
  seen = []
  monkeypatch.setattr(sharding, "initialize_distributed", lambda requested, **kw: seen.append(kw))
  for spelling in (["--max_steps", "3", "--num_processes", "2", "--process_id", "1"],
                   ["--max-steps=3", "--num-processes=2", "--process-id=1"]):
    code, _, err = _run(["--config", STAGE1, "--workdir", tmp_path / "w"] + spelling, capsys)
    assert code == 0, err
  assert [r[2] for r in runs] == [3, 3]
  assert seen == [{"coordinator": None, "num_processes": 2, "process_id": 1}] * 2
  _usage_error(["--config", STAGE1, "--workdir", tmp_path / "w", "--num-processes", "2", "--process-id", "2"],
               capsys, "--process_id 2: must be below --num_processes 2")
  _usage_error(["--config", STAGE1, "--workdir", tmp_path / "w", "--max-steps", "0"], capsys,
               "--max_steps=0: 0 is not a positive integer")


def test_bad_config_file_creates_nothing(tmp_path, runs, capsys):
  work = tmp_path / "w"
  _usage_error(["--config", tmp_path / "missing.py", "--workdir", work], capsys,
               f"--config {tmp_path / 'missing.py'}: file not found")
  _usage_error(["--config", STAGE1 + "x", "--workdir", work], capsys,
               f"--config {STAGE1}x: unknown config argument 'tinyx'; this recipe takes ['tiny', 'vit']")
  (tmp_path / "broken.py").write_text("import no_such_module_here\n")
  _usage_error(["--config", tmp_path / "broken.py", "--workdir", work], capsys,
               "cannot load the recipe: ModuleNotFoundError: No module named 'no_such_module_here'")
  _usage_error(["--workdir", work], capsys, "--config is required")
  _usage_error(["--config", STAGE1], capsys, "--workdir is required")
  _usage_error(["--config", STAGE1, "--workdir", work, "--bogus=1"], capsys, "Unknown command line flag 'bogus'")
  _usage_error(["--config", STAGE1, "--workdir", work, "extra"], capsys, "unexpected arguments: extra")
  assert os.listdir(tmp_path) == ["broken.py"] and runs == []


def test_misspelled_override_creates_nothing(tmp_path, runs, capsys):
  work = tmp_path / "w"
  _usage_error(["--config", STAGE1, "--workdir", work, "--config.modl.dtype=float32"], capsys,
               "--config.modl.dtype=float32: the config has no field 'modl' (did you mean 'model'?)")
  _usage_error(["--config", STAGE1, "--workdir", work, "--config.model.dtpe=float32"], capsys,
               "--config.model.dtpe=float32: the config has no field 'model.dtpe' (did you mean 'model.dtype'?)")
  _usage_error(["--config", STAGE1, "--workdir", work, "--config.global_batch_size=many"], capsys,
               "--config.global_batch_size=many: expected an integer")
  assert os.listdir(tmp_path) == [] and runs == []


@pytest.mark.parametrize("override,problem", [
    ("global_batch_size=0", "must be at least 1"),
    ("num_epochs=0", "must be at least 1 (or set total_steps): the run would have no steps"),
    ("model.dtype=float8", "expected one of float32, bfloat16, float16"),
    ("accum_steps=3", "must divide global_batch_size (8)"),
    ("model.image_size=30", "must be a multiple of the ViT's patch size 14"),
    ("optim.lr=-1.0", "must be a finite number >= 0"),
])
def test_config_values_refused_before_the_workdir(tmp_path, runs, capsys, override, problem):
  argv = ["--config", STAGE1, "--workdir", tmp_path / "w", f"--config.{override}"]
  if override.startswith("num_epochs"):
    argv.append("--config.total_steps=0")
  _usage_error(argv, capsys, f"--config.{override}: {problem}")
  assert os.listdir(tmp_path) == [] and runs == []


def test_recipe_values_named_as_config(tmp_path, runs, capsys):
  """A bad value the recipe itself holds is named "config KEY=VALUE" (the user did not set it)."""
  (tmp_path / "mine.py").write_text("from configs import stage1\n\n\ndef get_config(arg=None):\n"
                                    "  c = stage1.get_config('tiny')\n  c.global_batch_size = 0\n  return c\n")
  _usage_error(["--config", tmp_path / "mine.py", "--workdir", tmp_path / "w"], capsys,
               "config global_batch_size=0: must be at least 1")
  assert not os.path.exists(tmp_path / "w")


def test_workdir_that_cannot_be_written(tmp_path, runs, capsys, monkeypatch):
  (tmp_path / "file").write_text("x")
  _usage_error(["--config", STAGE1, "--workdir", tmp_path / "file"], capsys,
               f"--workdir {tmp_path / 'file'}: exists and is not a directory")
  _usage_error(["--config", STAGE1, "--workdir", tmp_path / "file" / "sub"], capsys,
               f"cannot be created: {tmp_path / 'file'} is a file")
  ro = tmp_path / "ro"
  ro.mkdir()
  os.chmod(ro, 0o555)
  if os.geteuid() == 0:  # permissions do not stop root: os.access reports the directory read-only
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if (
        os.path.abspath(p) == str(ro) and mode & os.W_OK) else real(p, mode, **kw))
  _usage_error(["--config", STAGE1, "--workdir", ro], capsys, f"--workdir {ro}: directory is not writable")
  _usage_error(["--config", STAGE1, "--workdir", ro / "w"], capsys, f"cannot be created: {ro} is not writable")
  assert os.listdir(ro) == [] and runs == []


def test_hub_id_not_cached_creates_nothing(tmp_path, runs, capsys):
  _usage_error(["--config", STAGE1, "--workdir", tmp_path / "w", "--config.model.pretrained=test-org/not-cached"],
               capsys, "--config.model.pretrained test-org/not-cached: no such local directory, and not in the "
               "Hugging Face cache", "hf download test-org/not-cached")
  assert not os.path.exists(tmp_path / "w")


def test_failure_is_one_line_exit_1_and_leaves_no_empty_workdir(tmp_path, capsys, monkeypatch):
  def fails(config, workdir, **kw):
    os.makedirs(os.path.join(workdir, "checkpoints"))
    raise ZeroDivisionError("division by zero")
  monkeypatch.setattr(loop, "train", fails)
  code, _, err = _run(["--config", STAGE1, "--workdir", tmp_path / "w"], capsys)
  assert code == 1 and err == ["error: ZeroDivisionError: division by zero (--debug shows the traceback)"]
  assert not os.path.exists(tmp_path / "w")
  code, _, err = _run(["--config", STAGE1, "--workdir", tmp_path / "w", "--debug"], capsys)
  assert code == 1 and err[0] == "Traceback (most recent call last):" and err[-1].startswith("error: ZeroDivision")
  code, _, err = _run(["--config", STAGE1 + "x", "--workdir", tmp_path / "w", "--debug"], capsys)
  assert code == 2 and err[0] == "Traceback (most recent call last):" and err[-1].startswith("error: --config")


def test_help(capsys):
  code, out, _ = _run(["--help"], capsys)
  assert code == 0 and "--max_steps" in out and "--config" in out


@pytest.mark.parametrize("name", ["stage1", "stage2", "caption_ft", "retrieval_ft", "vqa_ft", "instruct", "demo"])
def test_every_recipe_passes_the_value_checks(name):
  module = importlib.import_module(f"configs.{name}")
  args = {"demo": ["stage=1", "stage=2"], "vqa_ft": [None]}.get(name, [None, "tiny"])
  for arg in args:
    validate.check_values(module.get_config(arg))
