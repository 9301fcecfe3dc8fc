"""Bad input on every command line: one line on stderr naming the input and the problem, exit status 2,
nothing written and nothing lost; a failure during the work: one line, exit status 1; a traceback only
with --debug. The commands run in-process through main(argv) and stop before any weights load, except
the retrieve run (tiny checkpoint) and one subprocess run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from blip2_jax.checkpoints import tiny
from blip2_jax.cli import caption, convert, evaluate, finetune, options, parity, retrieve, vqa
from blip2_jax.data import synthetic

from helpers import run_cli, usage_error


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """Tiny checkpoints (opt, ret), broken checkpoint directories, images, a fine-tuning dataset."""
  from PIL import Image
  r = tmp_path_factory.mktemp("cli_errors")
  tiny.save_tiny(str(r / "opt"), "Blip2ForConditionalGeneration", "opt")
  tiny.save_tiny(str(r / "ret"), "Blip2ForImageTextRetrieval")
  (r / "empty").mkdir()
  (r / "bert").mkdir()
  (r / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
  for src, prefix in (("opt", ""), ("ret", "ret_")):  # retrieve checks the kind first: a retrieval copy
    for name in ("noweights", "truncated"):
      (r / (prefix + name)).mkdir()
      for f in os.listdir(r / src):
        if name == "truncated" or f != "model.safetensors":
          (r / (prefix + name) / f).write_bytes((r / src / f).read_bytes())
    weights = r / (prefix + "truncated") / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)  # a download cut short: the header is whole
  (r / "imgs").mkdir()
  rng = np.random.default_rng(0)
  for n in ("a.png", "b.png"):
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(r / "imgs" / n)
  (r / "texts.txt").write_text("a red car\ntwo dogs on the grass\n")
  synthetic.write_shapes_dataset(str(r / "data"), "train", "caption", 8)
  return r


def _read_only(path, monkeypatch):
  """Makes `path` read-only; as root (whom permissions do not stop) os.access reports it so."""
  os.chmod(path, 0o555)
  if os.geteuid() == 0:
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if (
        os.path.abspath(p) == os.path.abspath(path) and mode & os.W_OK) else real(p, mode, **kw))


def _tool_argv(tool, r, model, tmp_path):
  """A command line of `tool` that is fine apart from --model, with an --output / --workdir in tmp_path."""
  out = tmp_path / "out.json"
  ann = tmp_path / "ann.json"
  ann.write_text(json.dumps([{"image": "a.png", "caption": ["a red car"]}]))
  return {
      "caption": (caption.main, ["--model", model, r / "imgs" / "a.png", "--output", out]),
      "vqa": (vqa.main, ["--model", model, "--image", r / "imgs" / "a.png", "--question", "what", "--output", out]),
      "retrieve": (retrieve.main, ["--model", model, "--images-dir", r / "imgs", "--texts", r / "texts.txt",
                                   "--output", out]),
      "evaluate": (evaluate.main, ["--task", "caption", "--model", model, "--annotations", ann,
                                   "--images-dir", r / "imgs", "--output", out]),
      "parity": (parity.main, ["--hf-dir", model]),
      "finetune": (finetune.main, ["--model", model, "--task", "caption", "--train", r / "data" / "train.jsonl",
                                   "--images-dir", r / "data" / "images", "--workdir", tmp_path / "work"]),
  }[tool]


# ----------------------------------------------------------------------------------------
# --model directories


BAD_MODELS = {"missing": "no such directory", "empty": "the directory is empty",
              "bert": "describes a 'bert' model (BertModel), not a BLIP-2", "noweights": "no weights file",
              "truncated": "is truncated or corrupt"}


@pytest.mark.parametrize("tool", ["caption", "vqa", "retrieve", "evaluate", "parity", "finetune"])
def test_bad_model_directory(root, tmp_path, capsys, tool):
  for name, problem in BAD_MODELS.items():
    model = root / (f"ret_{name}" if tool == "retrieve" and name in ("noweights", "truncated") else name)
    main, argv = _tool_argv(tool, root, model, tmp_path)
    flag = "--hf-dir" if tool == "parity" else "--model"
    usage_error(main, argv, capsys, f"{flag} {model}", problem)
    assert sorted(os.listdir(tmp_path)) == ["ann.json"], name  # no --output, no empty --workdir


def test_wrong_kind_of_checkpoint(root, tmp_path, capsys):
  main, argv = _tool_argv("retrieve", root, root / "opt", tmp_path)
  usage_error(main, argv, capsys, "is a Blip2ForConditionalGeneration checkpoint; retrieval needs a "
               "Blip2ForImageTextRetrieval one")
  main, argv = _tool_argv("vqa", root, root / "ret", tmp_path)
  usage_error(main, argv, capsys, "is a Blip2ForImageTextRetrieval checkpoint, which has no language model")
  main, argv = _tool_argv("finetune", root, root / "ret", tmp_path)
  usage_error(main, argv, capsys, "has no language model")
  assert sorted(os.listdir(tmp_path)) == ["ann.json"]


# ----------------------------------------------------------------------------------------
# output paths: checked before any work


@pytest.mark.parametrize("tool", ["caption", "vqa", "retrieve", "evaluate"])
def test_output_checked_before_any_work(root, tmp_path, capsys, monkeypatch, tool):
  import blip2_jax

  def no_loading(*a, **k):
    raise AssertionError("weights loaded before --output was checked")
  monkeypatch.setattr(blip2_jax, "from_pretrained", no_loading)
  model = root / ("ret" if tool == "retrieve" else "opt")
  main, argv = _tool_argv(tool, root, model, tmp_path)
  i = argv.index("--output") + 1
  argv[i] = tmp_path / "missing" / "out.json"
  usage_error(main, argv, capsys, f"--output {argv[i]}: directory {tmp_path / 'missing'} does not exist")
  argv[i] = tmp_path
  usage_error(main, argv, capsys, f"--output {tmp_path}: is a directory")
  ro = tmp_path / "ro"
  ro.mkdir()
  _read_only(ro, monkeypatch)
  argv[i] = ro / "out.json"
  usage_error(main, argv, capsys, f"--output {argv[i]}: directory {ro} is not writable")
  assert os.listdir(ro) == [] and not os.path.exists(tmp_path / "missing")


# ----------------------------------------------------------------------------------------
# retrieve


def test_retrieve_flags_and_texts_before_the_model(root, tmp_path, capsys, monkeypatch):
  import blip2_jax
  monkeypatch.setattr(blip2_jax, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
  main, argv = _tool_argv("retrieve", root, root / "ret", tmp_path)
  for flag, value in (("--batch-size", "0"), ("--k", "0"), ("--k", "-1"), ("--top", "0")):
    usage_error(main, argv + [flag, value], capsys, f"argument {flag}: must be at least 1, got {value}")
  usage_error(main, argv + ["--k", "many"], capsys, "argument --k: expected an integer, got 'many'")
  i = argv.index("--texts") + 1
  argv[i] = tmp_path / "nope.txt"
  usage_error(main, argv, capsys, f"--texts {argv[i]}: file not found")
  (tmp_path / "blank.txt").write_text("\n  \n")
  argv[i] = tmp_path / "blank.txt"
  usage_error(main, argv, capsys, f"--texts {argv[i]}: holds no non-empty lines")
  (tmp_path / "noimgs").mkdir()
  argv[i], argv[argv.index("--images-dir") + 1] = root / "texts.txt", tmp_path / "noimgs"
  usage_error(main, argv, capsys, f"--images-dir {tmp_path / 'noimgs'}: holds no images")
  assert not os.path.exists(tmp_path / "out.json")


def test_retrieve_skips_unreadable_images_and_marks_itc_only_scores(root, tmp_path, capsys):
  imgs = tmp_path / "imgs"
  imgs.mkdir()
  for n in ("a.png", "b.png"):
    (imgs / n).write_bytes((root / "imgs" / n).read_bytes())
  (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  out = tmp_path / "scores.json"
  code, printed, err = run_cli(retrieve.main, ["--model", root / "ret", "--images-dir", imgs, "--texts",
                                            root / "texts.txt", "--k", "1", "--top", "2", "--output", out], capsys)
  assert code == 1  # as caption: the others are ranked, the unreadable one is listed
  err = "\n".join(err)  # after the progress bars
  assert "skipped 1 unreadable image(s):\n  broken.png: " in err
  assert "-100" not in printed
  blocks = printed.split("text -> image")
  assert blocks[0].count("(ITC only, not re-ranked)") == 2 and blocks[1].count("(ITC only, not re-ranked)") == 2
  for block in blocks:  # per query: the re-ranked candidate first, then the ITC-only one
    lines = [ln for ln in block.splitlines() if ln.startswith("  ")]
    assert [("ITC only" in ln) for ln in lines] == [False, True] * 2, block
  saved = json.loads(out.read_text())
  assert saved["images"] == ["a.png", "b.png"] and np.array(saved["i2t"]).shape == (2, 2)


# ----------------------------------------------------------------------------------------
# caption / vqa / evaluate flags


def test_caption_and_vqa_inputs(root, tmp_path, capsys):
  model = root / "opt"
  usage_error(caption.main, ["--model", model, tmp_path / "nope.png"], capsys,
               f"image file not found: {tmp_path / 'nope.png'}")
  usage_error(caption.main, ["--model", model], capsys, "no images: give IMAGE files and/or --images-dir")
  usage_error(caption.main, ["--model", model, root / "imgs" / "a.png", "--batch-size", "0"], capsys,
               "argument --batch-size: must be at least 1, got 0")
  a, b = root / "imgs" / "a.png", root / "imgs" / "b.png"
  usage_error(vqa.main, ["--model", model, "--image", a, "--image", b, "--question", "what"], capsys,
               f"--image given 2 times ({a}, {b}): vqa answers questions about one image")
  (tmp_path / "broken.png").write_bytes(b"not an image")
  usage_error(vqa.main, ["--model", model, "--image", tmp_path / "broken.png", "--question", "what"], capsys,
               "--image:", "broken.png")
  usage_error(vqa.main, ["--model", model, "--image", a, "--question", " "], capsys, "--question must not be empty")


def test_help_texts(capsys):
  def help_of(main):
    with pytest.raises(SystemExit) as e:
      main(["--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())
  text = help_of(evaluate.main)  # the formats, not "see the module doc"
  assert "coco_karpathy_test.json" in text and "captions_*.json" in text and "flickr30k_test.json" in text
  assert "module doc" not in text
  for main in (caption.main, vqa.main, retrieve.main, evaluate.main, parity.main, finetune.main, convert.main):
    assert "--debug" in help_of(main)
  assert "images per compiled batch" in help_of(caption.main)
  text = help_of(vqa.main)
  assert "images per compiled batch" in text and "the image file the questions are about (one a run)" in text
  assert "(ITC only, not re-ranked)" in help_of(retrieve.main)


def test_evaluate_names_records_from_one(root, tmp_path, capsys):
  """JSON Lines problems name the file line ("FILE:N"), JSON lists the record ("FILE: record N"), both
  from 1, as finetune's report does."""
  base = ["--task", "caption", "--model", root / "opt", "--images-dir", root / "imgs"]
  jsonl = tmp_path / "a.jsonl"
  jsonl.write_text('{"image": "a.png", "caption": "x"}\n\n{"image": "b.png", "captions": ["y"]}\n')
  usage_error(evaluate.main, base + ["--annotations", jsonl], capsys, f"{jsonl}:3: no 'caption' key")
  js = tmp_path / "a.json"
  js.write_text(json.dumps([{"image": "a.png", "caption": "x"}, {"image": "b.png", "caption": 42}]))
  usage_error(evaluate.main, base + ["--annotations", js], capsys,
               f"{js}: record 2: 'caption' must be a string or a list, not a number (42)")
  js.write_text(json.dumps([{"image": ["a.png"], "caption": "x"}]))
  usage_error(evaluate.main, base + ["--annotations", js], capsys,
               f"{js}: record 1: 'image' must be a string, not a list")
  js.write_text(json.dumps([{"image": "a.png", "caption": "x"}, {"image": "gone.png", "caption": "y"}]))
  usage_error(evaluate.main, base + ["--annotations", js], capsys, "1 image file(s) of the annotations not found",
               "gone.png")


# ----------------------------------------------------------------------------------------
# finetune


def _ft(root, workdir, *extra):
  return ["--model", root / "opt", "--task", "caption", "--train", root / "data" / "train.jsonl",
          "--images-dir", root / "data" / "images", "--workdir", workdir, "--set", "global_batch_size=4", *extra]


def test_finetune_config_values_refused_before_the_workdir(root, tmp_path, capsys):
  work = tmp_path / "work"
  for setting, problem in (("global_batch_size=0", "must be at least 1"),
                           ("num_epochs=0", "must be at least 1 (or set total_steps)"),
                           ("model.dtype=float8", "expected one of float32, bfloat16, float16"),
                           ("model.num_query_tokens=8", "comes from the checkpoint"),
                           ("model.image_size=30", "must be a multiple of the ViT's patch size 14"),
                           ("mesh=2,-1,-1", "expected data,fsdp,tensor")):
    usage_error(finetune.main, _ft(root, work, "--set", setting), capsys, f"--set {setting}: {problem}")
  usage_error(finetune.main, _ft(root, work, "--max_steps", "0"), capsys,
               "argument --max-steps/--max_steps: must be at least 1, got 0")
  (tmp_path / "file").write_text("x")
  usage_error(finetune.main, _ft(root, tmp_path / "file"), capsys,
               f"--workdir {tmp_path / 'file'}: exists and is not a directory")
  usage_error(finetune.main, _ft(root, tmp_path / "file" / "sub"), capsys,
               f"cannot be created: {tmp_path / 'file'} is a file")
  assert sorted(os.listdir(tmp_path)) == ["file"]


def test_finetune_read_only_workdir(root, tmp_path, capsys, monkeypatch):
  ro = tmp_path / "ro"
  ro.mkdir()
  _read_only(ro, monkeypatch)
  usage_error(finetune.main, _ft(root, ro / "run"), capsys, f"--workdir {ro / 'run'}: cannot be created: "
               f"{ro} is not writable")
  usage_error(finetune.main, _ft(root, ro), capsys, f"--workdir {ro}: directory is not writable")
  assert os.listdir(ro) == []


def test_finetune_flags_and_print_config(root, tmp_path, capsys):
  """Both spellings of the multi-process flags (the trainer's are absl's --max_steps ...); --print-config
  shows the checkpoint's sizes, not the recipe's."""
  p = finetune.parser()
  for spelling in (["--max_steps", "3", "--num_processes", "2", "--process_id", "1"],
                   ["--max-steps", "3", "--num-processes", "2", "--process-id", "1"]):
    a = p.parse_args([str(x) for x in _ft(root, tmp_path / "w")] + spelling)
    assert (a.max_steps, a.num_processes, a.process_id) == (3, 2, 1)
  code, out, err = run_cli(finetune.main, _ft(root, tmp_path / "w", "--print-config"), capsys)
  assert code == 0, err
  assert "num_query_tokens: 4\n" in out and "num_query_tokens: 32" not in out  # the tiny checkpoint has 4
  assert not os.path.exists(tmp_path / "w")


def test_finetune_failure_leaves_no_empty_workdir(root, tmp_path, capsys, monkeypatch):
  from blip2_jax.train import loop

  def fails(config, workdir, **kw):
    os.makedirs(os.path.join(workdir, "checkpoints"))
    raise ZeroDivisionError("division by zero")
  monkeypatch.setattr(loop, "train", fails)
  code, _, err = run_cli(finetune.main, _ft(root, tmp_path / "w"), capsys)
  assert code == 1 and err == ["error: ZeroDivisionError: division by zero (--debug shows the traceback)"]
  assert not os.path.exists(tmp_path / "w")
  code, _, err = run_cli(finetune.main, _ft(root, tmp_path / "w", "--debug"), capsys)
  assert code == 1 and err[0] == "Traceback (most recent call last):" and err[-1].startswith("error: ZeroDivision")


def test_finetune_annotation_messages(root, tmp_path, capsys):
  """Wrong types are named as such (not "empty text" / "missing image path"); two unreadable image files
  are two problems, found before training (which would count a skip per visit)."""
  images = root / "data" / "images"
  (tmp_path / "broken1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  (tmp_path / "broken2.jpg").write_bytes(b"GIF89a")
  good = json.loads((root / "data" / "train.jsonl").read_text().splitlines()[0])
  recs = [good, {"image": good["image"], "caption": 42}, {"image": ["a.png"], "caption": "x"},
          {"image": str(tmp_path / "broken1.png"), "caption": "x"}, {"image": str(tmp_path / "broken2.jpg"),
                                                                     "caption": "y"}]
  train = tmp_path / "train.jsonl"
  train.write_text("".join(json.dumps(r) + "\n" for r in recs))
  code, _, err = run_cli(finetune.main, ["--model", root / "opt", "--task", "caption", "--train", train,
                                      "--images-dir", images, "--workdir", tmp_path / "w",
                                      "--allow-outside-images-dir"], capsys)  # the broken files lie outside
  assert code == 2
  assert err[0] == f"error: {train}: 4 problem(s) on 4 line(s):"
  assert err[1] == f'  {train}:2: "caption" must be a string or a list of strings, not a number (42)'
  assert err[2] == f'  {train}:3: "image" must be a path string, not a list (["a.png"])'
  assert err[3].startswith(f"  {train}:4: not a readable image: {tmp_path / 'broken1.png'}")
  assert err[4].startswith(f"  {train}:5: not a readable image: {tmp_path / 'broken2.jpg'}")
  # a JSON list: record numbers
  js = tmp_path / "train.json"
  js.write_text(json.dumps(recs[:2]))
  code, _, err = run_cli(finetune.main, ["--model", root / "opt", "--task", "caption", "--train", js,
                                      "--images-dir", images, "--workdir", tmp_path / "w"], capsys)
  assert code == 2 and err[0] == f"error: {js}: 1 problem(s) in 1 record(s):"
  assert err[1].startswith(f"  {js}: record 2: \"caption\" must be")
  assert not os.path.exists(tmp_path / "w")


# ----------------------------------------------------------------------------------------
# data.convert, parity flags, --debug, the entry point


def test_convert_bad_input_writes_nothing(root, tmp_path, capsys):
  out = tmp_path / "shards" / "train"
  base = ["--images-dir", root / "data" / "images", "--output", out, "--no-progress"]
  usage_error(convert.main, ["--annotations", tmp_path / "nope.json"] + base, capsys,
               f"--annotations {tmp_path / 'nope.json'}: file not found")
  (tmp_path / "bad.json").write_text("[{oops")
  usage_error(convert.main, ["--annotations", tmp_path / "bad.json"] + base, capsys,
               f"--annotations {tmp_path / 'bad.json'}: ")
  usage_error(convert.main, ["--annotations", root / "data" / "train.jsonl", "--num-shards", "0"] + base, capsys,
               "argument --num-shards: must be at least 1, got 0")
  assert os.listdir(tmp_path) == ["bad.json"]


def test_parity_flags(root, capsys):
  usage_error(parity.main, [], capsys, "one of the arguments --hf-dir --tiny-random is required")
  usage_error(parity.main, ["--tiny-random", "gpt2"], capsys, "argument --tiny-random: invalid choice: 'gpt2'")
  usage_error(parity.main, ["--hf-dir", root / "opt", "--batch", "0"], capsys, "argument --batch: must be at least 1")
  usage_error(parity.main, ["--hf-dir", root / "opt", "--threshold", "-1"], capsys,
               "argument --threshold: must be a finite number >= 0")


def test_debug_shows_the_traceback(root, capsys):
  code, _, err = run_cli(caption.main, ["--model", root / "missing", "x.png", "--debug"], capsys)
  assert code == 2 and err[0] == "Traceback (most recent call last):"
  assert err[-1] == "error: image file not found: x.png"


def test_run_maps_exceptions_to_exit_statuses(capsys):
  def raises(e):
    def main(argv):
      raise e
    return main
  assert options.run(raises(options.UsageError("--x 3: too big")), []) == 2
  assert capsys.readouterr().err == "error: --x 3: too big\n"
  assert options.run(raises(KeyError("k")), []) == 1
  assert capsys.readouterr().err == "error: KeyError: 'k' (--debug shows the traceback)\n"
  assert options.run(raises(KeyboardInterrupt()), []) == 130
  assert capsys.readouterr().err == "interrupted\n"


def test_entry_point_prints_one_line_and_no_traceback(root, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  r = subprocess.run([sys.executable, "-m", "blip2_jax.caption", "--model", str(root / "truncated"),
                      str(root / "imgs" / "a.png"), "--output", str(tmp_path / "caps.jsonl")],
                     capture_output=True, text=True, env=env, timeout=120)
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: --model {root / 'truncated'}: ")
  assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "caps.jsonl")
