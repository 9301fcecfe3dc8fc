"""A non-editable install works: the wheel built from this checkout is installed (without dependencies)
into a fresh venv that sees this environment's packages through a .pth file, and its console scripts
run from a directory outside the repository: blip2-train on a recipe named by absolute path (the
recipe's `from configs import common` included), then blip2-caption on the exported stage-1 model
(the Q-Former's own LM head). About a minute, most of it compiling the tiny stage-1 step."""
import os
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("blip2-caption", "blip2-vqa", "blip2-retrieve", "blip2-evaluate", "blip2-parity", "blip2-train",
            "blip2-finetune", "blip2-demo", "blip2-aot", "blip2-convert")
SOURCES = ("setup.py", "README.md", "requirements.txt", "requirements-test.txt", "MANIFEST.in", "blip2_jax", "configs")


def _can_build_offline() -> bool:
  """setuptools >= 70.1 builds wheels itself; older ones need the wheel package (no download here)."""
  import importlib.util

  import setuptools
  major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
  return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _build_wheel(tmp_path) -> str:
  """The wheel of a copy of the sources (a build writes build/ and *.egg-info beside setup.py)."""
  src, dist = tmp_path / "src", tmp_path / "dist"
  for name in SOURCES:
    path = os.path.join(ROOT, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      os.makedirs(src, exist_ok=True)
      shutil.copy(path, src / name)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  "-w", str(dist), str(src)], check=True, capture_output=True, timeout=300)
  [wheel] = os.listdir(dist)
  return str(dist / wheel)


def _venv_with_this_environment(path) -> str:
  """A venv without pip whose site-packages also reads this interpreter's (a .pth line: appended to
  sys.path, so the venv's own packages come first and this environment's .pth files are not run)."""
  venv.create(path, with_pip=False)
  python = os.path.join(path, "bin", "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True).stdout.strip()
  ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
  with open(os.path.join(site, "this_environment.pth"), "w") as f:
    f.write("".join(p + "\n" for p in ours))
  return python


@pytest.mark.skipif(sys.platform == "win32", reason="venv layout (bin/)")
@pytest.mark.skipif(not _can_build_offline(), reason="needs setuptools >= 70.1 or the wheel package")
def test_wheel_installs_and_its_commands_train_and_caption(tmp_path):
  from PIL import Image
  python = _venv_with_this_environment(tmp_path / "venv")
  subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", _build_wheel(tmp_path)],
                 check=True, capture_output=True, timeout=300)
  bin_dir = tmp_path / "venv" / "bin"
  assert set(COMMANDS) <= set(os.listdir(bin_dir))

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  # one CPU device (no 8-device mesh) compiles the tiny step fastest
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_backend_optimization_level=0")

  def run(*argv):
    r = subprocess.run([str(a) for a in argv], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (argv, r.stdout[-2000:], r.stderr[-4000:])
    return r.stdout

  where = run(python, "-c", "import blip2_jax; from blip2_jax.train import recipe_module\n"
              "print(blip2_jax.__file__); print(recipe_module('caption_ft').__file__)").split()
  site = os.path.realpath(tmp_path / "venv")
  assert all(os.path.realpath(p).startswith(site) for p in where), where  # the installed copy, its recipes

  run(bin_dir / "blip2-train", "--config", os.path.join(ROOT, "configs", "stage1.py") + ":tiny", "--workdir", "w",
      "--config.total_steps=2", "--config.eval_every=-1", "--max-steps", "2")
  assert os.path.isfile(elsewhere / "w" / "hf" / "qformer_lm_head.safetensors")
  Image.new("RGB", (32, 32), (200, 30, 30)).save(elsewhere / "red.png")
  out = run(bin_dir / "blip2-caption", "--model", "w/hf", "red.png", "--num-beams", "1", "--min-new-tokens", "1",
            "--max-new-tokens", "3")
  [line] = out.splitlines()
  assert line.startswith("red.png\t"), line
