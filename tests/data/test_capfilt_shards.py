"""CapFilt's output (data/capfilt_shards.py): records and manifests, a run killed with SIGKILL and
resumed holding every input image exactly once, another job refused, several processes, and
training reading the output: one kept caption drawn per image per step, the same after a resume,
and a tiny stage-1 run through `python -m blip2_jax.train`."""
import json
import os
import signal
import subprocess
import sys
import time

import grain
import pytest

from blip2_jax import data
from blip2_jax.cli import train as train_cli
from blip2_jax.core.errors import UsageError
from blip2_jax.data import capfilt_shards, input_shards, sources
from blip2_jax.data.capfilt_shards import CapfiltOutput

import capfilt_writer
from capfilt_writer import run
from helpers import run_cli, usage_error
from image_text_files import image_bytes, write_annotations, write_img2dataset, write_tar

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture
def inputs(tmp_path):
  """Two img2dataset shards (one with every odd sample), a truncated tar and a JSONL file with images:
  -> (inputs, keys of the images that decode)."""
  keys = write_img2dataset(tmp_path / "dl", shards=2, per_shard=4)
  keys.remove("000000005")  # not an image
  members = []
  for i in range(4):
    members += [(f"9{i:03d}.jpg", image_bytes(50 + i)), (f"9{i:03d}.txt", f"cut {i}".encode())]
  os.makedirs(tmp_path / "cut")
  write_tar(tmp_path / "cut" / "00000.tar", members)
  raw = (tmp_path / "cut" / "00000.tar").read_bytes()
  (tmp_path / "cut" / "00000.tar").write_bytes(raw[:len(raw) // 2])
  cut_keys = [k for k, _ in input_shards.TarGroups(tmp_path / "cut" / "00000.tar")]
  ann = write_annotations(tmp_path / "ann", n=4)
  return [str(tmp_path / "dl"), str(tmp_path / "cut"), ann], keys + cut_keys + [f"images/im{i}.png" for i in range(4)]


def _records(directory):
  """(shard, header) of every record of the complete shards."""
  out = CapfiltOutput(directory)
  recs = []
  for name in out.completed_shards():
    src = sources.ArrayRecordSource([out.path(name, capfilt_shards.RECORDS)])
    recs += [(name, src[i]) for i in range(len(src))]
  return recs


def test_records_manifests_and_summary(tmp_path, inputs):
  paths, keys = inputs
  lines = run(paths, tmp_path / "out")
  n_cut = sum(k.startswith("9") for k in keys)  # the truncated tar's samples before the cut
  assert lines == [f"cut-00000: damaged after {n_cut} sample(s), at byte " + lines[0].split("at byte ")[1]]
  recs = _records(tmp_path / "out")
  assert sorted(h["key"] for _, h in recs) == sorted(keys)
  by = {h["key"]: h for _, h in recs}
  h = by["000000000"]
  assert h["caption"] == [capfilt_writer.synthetic_caption("000000000"), "a red car"]
  assert h["capfilt"] == {"scores": [0.75, 0.5], "origins": ["synthetic", "web"], "filter": "clip"}
  assert h["url"] == "http://example.com/000000000.jpg" and h["img2dataset_key"] == "000000000"
  assert h["image"] == image_bytes(0, "JPEG")  # the bytes as read, not re-encoded
  assert by["000000003"]["caption"] == [capfilt_writer.synthetic_caption("000000003")]  # no web text
  assert by["images/im1.png"]["image_path"] == "images/im1.png" and by["images/im1.png"]["image_id"] == 1
  out = CapfiltOutput(tmp_path / "out")
  m = out.manifest("dl-00000")
  assert m["read"] == 7 and m["kept"] == 5 and m["skipped"] == {"no image": 1, "not an image": 1}
  assert m["skipped_keys"] == {"no image": ["000000004"], "not an image": ["000000005"]}
  assert m["captions"] == {"web": 4, "synthetic": 5} and m["damage"] is None
  assert m["read"] == m["kept"] + sum(m["skipped"].values())
  d = out.manifest("cut-00000")["damage"]
  assert d["samples"] == n_cut and d["offset"] > 0 and d["record"] is None
  s = capfilt_shards.summary(tmp_path / "out")
  assert s["complete"] == s["shards"] == len(out.completed_shards()) and s["incomplete"] == []
  assert s["kept"] == len(keys) and s["read"] == s["kept"] + sum(s["skipped"].values())
  assert s["skipped"] == {"image file not found": 1, "no image": 1, "no image path": 1, "not an image": 1}
  assert [x["shard"] for x in s["damaged"]] == ["cut-00000"]
  # training reads the complete shards; a plain directory listing is refused (it cannot tell complete ones)
  assert capfilt_shards.array_record_paths(str(tmp_path / "out")) == [
      out.path(n, ".array_record") for n in out.completed_shards() if out.manifest(n)["kept"]]
  with pytest.raises(ValueError, match="is a CapFilt output directory"):
    sources.shard_paths(str(tmp_path / "out"))


def test_killed_run_resumes_with_every_image_once(tmp_path, inputs):
  paths, keys = inputs
  out_dir = tmp_path / "out"
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, HERE])}
  proc = subprocess.Popen([sys.executable, os.path.join(HERE, "capfilt_writer.py"), str(out_dir), "0.1", *paths],
                          env=env, stderr=subprocess.PIPE)
  deadline = time.time() + 120  # a loaded machine starts Python slowly
  while time.time() < deadline:  # killed inside a shard once one shard is complete
    names = os.listdir(out_dir) if out_dir.is_dir() else []
    if any(n.endswith(".manifest.json") for n in names) and any(n.endswith(".array_record.partial") for n in names):
      break
    assert proc.poll() is None, proc.stderr.read().decode()
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out = CapfiltOutput(out_dir)
  done = out.completed_shards()
  assert 1 <= len(done) < len(out.shard_names)
  assert any(n.endswith(".partial") for n in os.listdir(out_dir))
  written = [h["key"] for _, h in _records(out_dir)]
  assert 0 < len(written) == len(set(written)) < len(keys)
  # the shard after a killed rename: its records are there, its manifest is not
  victim = next(n for n in out.shard_names if n not in done)
  run(paths, out_dir)
  os.remove(out.path(victim, capfilt_shards.MANIFEST))
  assert victim not in out.completed_shards()
  run(paths, out_dir)  # rerun the same job: redoes what is missing
  assert not any(n.endswith(".partial") for n in os.listdir(out_dir))
  got = [h["key"] for _, h in _records(out_dir)]
  assert len(got) == len(set(got)) and sorted(got) == sorted(keys)
  first = {n: open(out.path(n, ".array_record"), "rb").read() for n in out.shard_names}
  # the output does not depend on the number of processes, nor on the Python process that wrote a shard
  # (the killed writer's shards hold the same sampling seeds as these)
  for count in (2, 3):
    other = tmp_path / f"p{count}"
    for i in reversed(range(count)):  # process 0 last: the others find no run record yet
      run(paths, other, process_index=i, process_count=count)
    assert {n: open(CapfiltOutput(other).path(n, ".array_record"), "rb").read() for n in out.shard_names} == first
    assert json.load(open(other / "capfilt.json")) == json.load(open(out_dir / "capfilt.json"))


def test_another_job_is_refused(tmp_path, inputs):
  paths, _ = inputs
  run(paths[:1], tmp_path / "out")
  before = sorted(os.listdir(tmp_path / "out"))
  with pytest.raises(UsageError) as e:
    run(paths[:1], tmp_path / "out", settings={"filter": "blip-itm"})
  assert 'filter: "clip" there, "blip-itm" here' in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(UsageError, match=r"input shards: 2 there, 3 here, shard 1 \"00000\" there, \"dl-00000\" here"):
    run(paths[:2], tmp_path / "out", settings={"inputs": paths[:1]})
  assert sorted(os.listdir(tmp_path / "out")) == before
  run(paths[:1], tmp_path / "out")  # the same job resumes (nothing left to do)
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  with pytest.raises(UsageError, match=r"busy is not empty \(notes.txt, ...\) and holds no CapFilt run"):
    run(paths[:1], tmp_path / "busy")
  with pytest.raises(UsageError, match="holds the input"):
    run(paths[:1], paths[0])
  (tmp_path / "file").write_text("")
  with pytest.raises(UsageError, match="not a directory"):
    run(paths[:1], tmp_path / "file")


def test_writer_checks_what_it_is_given(tmp_path, inputs):
  paths, _ = inputs
  shards = input_shards.list_input_shards(paths[2], records_per_shard=100)
  out = CapfiltOutput(tmp_path / "o")
  out.start(capfilt_writer.SETTINGS, shards)
  with pytest.raises(ValueError, match="written twice"):
    with out.write_shard(shards[0]) as w:
      s = next(iter(w.samples()))
      w.write(s, ["a"], [1.0], ["web"])
      w.write(s, ["b"], [1.0], ["web"])
  assert os.listdir(tmp_path / "o") == ["capfilt.json"]  # a failed shard leaves nothing
  with out.write_shard(shards[0]) as w:
    s = next(iter(w.samples()))
    for bad in ((["a"], [1.0, 2.0], ["web"]), (["a"], [1.0], ["model"]), (["a"], [float("nan")], ["web"])):
      with pytest.raises(ValueError):
        w.write(s, *bad)
    w.write(s, [], [], [])  # the filter kept nothing: the image is dropped, and counted
  assert out.manifest(shards[0].name)["skipped"] == {"no caption kept": 1}


def test_one_kept_caption_per_step_the_same_after_resume(tmp_path, inputs):
  paths, _ = inputs
  run(paths[:1], tmp_path / "out")
  src = sources.ArrayRecordSource(capfilt_shards.array_record_paths(str(tmp_path / "out")))

  def loader(seed=0):
    return data.make_train_loader(src, global_batch_size=2, image_size=16, seed=seed, augment=False,
                                  shard_options=grain.sharding.NoSharding(),
                                  read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))

  def texts(batches):
    return [(int(i), str(t)) for b in batches for i, t in zip(b["index"], b["text"])]

  it = iter(loader())
  full = texts(next(it) for _ in range(12))
  it = iter(loader())
  head = texts(next(it) for _ in range(5))
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  it = iter(loader())
  it.set_state(state)
  assert head + texts(next(it) for _ in range(7)) == full
  # each draw is one of the image's kept captions, and both are drawn over the epochs
  kept = {i: [data.pre_caption(c) for c in src[i]["caption"]] for i in range(len(src))}
  assert all(t in kept[i] for i, t in full)
  two = [i for i in kept if len(kept[i]) == 2]
  assert any({t for j, t in full if j == i} == set(kept[i]) for i in two)
  assert texts(next(iter(loader(seed=1))) for _ in range(1)) != full[:2]


def test_tiny_stage1_trains_on_capfilt_output(tmp_path, inputs, capsys):
  paths, _ = inputs
  run(paths, tmp_path / "out")
  config = os.path.join(REPO, "configs", "stage1.py") + ":tiny"
  # the recipe's step as tests/train/test_recipes.py compiles it (a persistent-cache hit in one session)
  common = ["--config", config, "--config.data.source=array_record", "--max-steps=3", "--config.log_every=1",
            "--config.eval_every=-1", "--config.export_hf=false"]
  # a CapFilt directory without a complete shard is bad input: one line, nothing created
  CapfiltOutput(tmp_path / "empty").start(capfilt_writer.SETTINGS, input_shards.list_input_shards(paths[0]))
  usage_error(train_cli.main, common + [f"--config.data.array_record={tmp_path / 'empty'}", "--workdir",
                                        tmp_path / "w0"], capsys, "no complete shard with a kept image yet (0 of 2")
  assert not (tmp_path / "w0").exists()
  code, out, err = run_cli(train_cli.main, common + [f"--config.data.array_record={tmp_path / 'out'}",
                                                     "--workdir", tmp_path / "w"], capsys)
  assert code == 0, err
  losses = [json.loads(x) for x in open(tmp_path / "w" / "metrics.jsonl") if '"loss"' in x]
  assert [x["step"] for x in losses] == [1, 2, 3] and all(x["loss"] > 0 for x in losses)
  assert sum(x["skipped_images"] for x in losses) == 0  # CapFilt kept only images that decode


def test_finetune_takes_a_capfilt_directory(tmp_path, inputs, tiny_checkpoint, capsys):
  from blip2_jax.cli import finetune
  paths, keys = inputs
  run(paths, tmp_path / "out")
  model = tiny_checkpoint("Blip2ForConditionalGeneration", "opt")
  argv = ["--model", model, "--train", tmp_path / "out", "--workdir", tmp_path / "w", "--set", "global_batch_size=4"]
  code, out, err = run_cli(finetune.main, argv + ["--task", "caption", "--print-config"], capsys)
  assert code == 0, err
  assert "source: array_record" in out and f"array_record: {tmp_path / 'out'}" in out
  assert f"num_epochs: 5" in out and f"checkpoint_every: {len(keys) // 4}" in out  # an epoch: every kept image once
  usage_error(finetune.main, argv + ["--task", "vqa"], capsys, "a CapFilt output holds caption records; --task vqa")
  usage_error(finetune.main, ["--model", model, "--train", tmp_path, "--workdir", tmp_path / "w", "--task", "caption"],
              capsys, f"--train {tmp_path}: a directory, but not a CapFilt output (capfilt.json)")
  assert not (tmp_path / "w").exists()
