"""Sources, grain pipelines (determinism, sharding, resume, skip counting), ArrayRecord conversion, TFDS."""
import json
import logging
import os

import grain
import numpy as np
import PIL.Image
import pytest

from blip2_jax import data
from blip2_jax.cli import convert as convert_cli
from blip2_jax.data import convert as convert_mod
from blip2_jax.data import pipeline, sources
from blip2_jax.data.processing import ImageProcessor

N_GOOD, SIZE, L = 10, 16, 8
FAST = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def toy_tokenize(text):
  """Word-hash ids, right-padded to L: enough to see which caption went where."""
  ids = [1] + [2 + sum(map(ord, w)) % 97 for w in text.split()][:L - 1]
  out, mask = np.zeros(L, np.int32), np.zeros(L, np.int32)
  out[:len(ids)], mask[:len(ids)] = ids, 1
  return {"input_ids": out, "attention_mask": mask}


def make_images(root, n=N_GOOD):
  """n small photos (sizes vary), one corrupt file; returns annotation records incl. a missing file."""
  os.makedirs(root / "imgs", exist_ok=True)
  recs = []
  for i in range(n):
    r = np.random.default_rng(i)
    h, w = 20 + 3 * i, 36 - 2 * i
    PIL.Image.fromarray(r.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "imgs" / f"im{i}.png")
    recs.append({"image": f"imgs/im{i}.png", "caption": f"Photo number {i}. A Dog!", "image_id": i})
  (root / "imgs" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF garbage")
  recs.insert(3, {"image": "imgs/bad.jpg", "caption": "corrupt", "image_id": 100})
  recs.insert(7, {"image": "imgs/missing.png", "caption": "missing", "image_id": 101})
  return recs


@pytest.fixture
def ann(tmp_path):
  recs = make_images(tmp_path)
  path = tmp_path / "train.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))
  return path, tmp_path, recs


def train(src, **kw):
  kw = {"global_batch_size": 2, "image_size": SIZE, "tokenize_fn": toy_tokenize, "seed": 0,
        "shard_options": grain.sharding.NoSharding(), "read_options": FAST, **kw}
  return data.make_train_loader(src, **kw)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------------------
# annotation files
# ----------------------------------------------------------------------------------------
def test_read_formats(tmp_path):
  lavis = [{"image": "a.jpg", "caption": ["one", "two"], "image_id": 1}, {"image": "b.jpg", "caption": "three"}]
  (tmp_path / "lavis.json").write_text(json.dumps(lavis))
  coco = {"images": [{"id": 5, "file_name": "x.jpg"}, {"id": 6, "file_name": "y.jpg"}],
          "annotations": [{"image_id": 6, "caption": "c1", "id": 1}, {"image_id": 5, "caption": "c2", "id": 2},
                          {"image_id": 6, "caption": "c3", "id": 3}]}
  (tmp_path / "coco.json").write_text(json.dumps(coco, indent=2))
  (tmp_path / "ft.jsonl").write_text('{"image": "q.jpg", "question": "what?", "answers": ["a", "b"]}\n\n'
                                     '{"image": "i.jpg", "instruction": "describe", "response": "a cat"}\n')
  assert data.read_annotations(tmp_path / "lavis.json") == lavis
  assert data.read_annotations(tmp_path / "coco.json") == [
      {"image": "x.jpg", "caption": ["c2"], "image_id": 5}, {"image": "y.jpg", "caption": ["c1", "c3"], "image_id": 6}]
  ft = data.read_annotations(tmp_path / "ft.jsonl")
  assert ft[0]["answers"] == ["a", "b"] and ft[1]["response"] == "a cat"
  src = data.AnnotationSource.from_file(tmp_path / "lavis.json")
  assert len(src) == 3 and [src[i]["caption"] for i in range(3)] == ["one", "two", "three"]
  assert src[0]["image"] == str(tmp_path / "a.jpg") and src[0]["image_path"] == "a.jpg"
  assert len(data.AnnotationSource.from_file(tmp_path / "lavis.json", expand_captions=False)) == 2
  ft_src = data.AnnotationSource.from_file(tmp_path / "ft.jsonl", images_dir=tmp_path / "imgs")
  assert ft_src[1]["image"] == str(tmp_path / "imgs" / "i.jpg") and ft_src[1]["instruction"] == "describe"


def test_validate_reports_bad_lines(tmp_path):
  (tmp_path / "ok.jpg").write_bytes(b"x")
  lines = [
      {"image": "ok.jpg", "caption": "fine"},                                   # 1
      {"image": "nope.jpg", "caption": "missing file"},                         # 2
      {"image": "ok.jpg", "caption": "  "},                                     # 3
      {"image": "ok.jpg", "question": "q?", "answers": "a"},                    # 4
      {"image": "ok.jpg", "instruction": "do", "response": "", "foo": 1},       # 5
      {"caption": "no image"},                                                  # 6
      {"image": "ok.jpg", "question": "q?", "answers": ["yes"], "question_id": 3},  # 7 fine
      {"image": "ok.jpg"},                                                      # 8
  ]
  text = "".join(json.dumps(r) + "\n" for r in lines) + "{not json\n"  # 9
  (tmp_path / "a.jsonl").write_text(text)
  probs = data.validate_annotations(tmp_path / "a.jsonl", tmp_path)
  by_line = {}
  for n, p in probs:
    by_line.setdefault(n, []).append(p)
  assert sorted(by_line) == [2, 3, 4, 5, 6, 8, 9], probs
  assert "not found" in by_line[2][0] and "nope.jpg" in by_line[2][0]
  assert "empty" in by_line[3][0]
  assert "answers" in by_line[4][0]
  assert any("empty" in p and "response" in p for p in by_line[5]) and any("foo" in p for p in by_line[5])
  assert "image" in by_line[6][0]
  assert "no text field" in by_line[8][0]
  assert "invalid JSON" in by_line[9][0]
  # a list of dicts: 1-based positions
  assert data.validate_annotations(lines[:2], tmp_path) == [(2, f"image file not found: {tmp_path / 'nope.jpg'}")]


# ----------------------------------------------------------------------------------------
# train pipeline
# ----------------------------------------------------------------------------------------
def test_train_batches_and_determinism(ann):
  path, root, _ = ann
  src = data.AnnotationSource.from_file(path, root)
  a = take(iter(train(src)), 6)  # > 1 epoch of 10 good records
  b = take(iter(train(src, read_options=grain.ReadOptions(num_threads=0))), 6)  # threads do not matter
  assert_same(a, b)
  x = a[0]
  assert x["image"].shape == (2, SIZE, SIZE, 3) and x["image"].dtype == np.float32
  assert x["input_ids"].shape == (2, L) and x["input_ids"].dtype == np.int32
  assert x["num_skipped"].shape == () and x["index"].shape == (2,)
  c = take(iter(train(src, seed=1)), 6)
  assert any(not np.array_equal(p["index"], q["index"]) for p, q in zip(a, c))
  # epochs are reshuffled and re-augmented
  e1 = np.concatenate([y["index"] for y in a[:4]])
  assert sorted(e1.tolist()) == sorted(set(e1.tolist()))


def test_augment_off_gives_the_eval_transform():
  from blip2_jax.data import processing, synthetic
  src = synthetic.ShapesSource(8, seed=3)
  b = next(iter(pipeline.make_train_loader(src, global_batch_size=4, image_size=32, seed=0, augment=False,
                                           shuffle=False)))
  want = np.stack([processing.ImageProcessor(32).preprocess_one(src[i]["image"]) for i in range(4)])
  np.testing.assert_array_equal(b["image"], want)
  aug = next(iter(pipeline.make_train_loader(src, global_batch_size=4, image_size=32, seed=0, shuffle=False)))
  assert not np.allclose(aug["image"], want)  # the default is BLIP-2's random crop + flip


def test_shards_are_disjoint(ann):
  path, root, _ = ann
  src = data.AnnotationSource.from_file(path, root)
  seen = []
  for i in range(2):
    it = iter(train(src, shard_options=grain.sharding.ShardOptions(i, 2, drop_remainder=True), num_epochs=1,
                    global_batch_size=2))  # 1 example per process and step
    seen.append({int(v) for b in it for v in b["index"]})
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(12)) - {3, 7}  # every good record once


def test_resume_reproduces_remaining_batches(ann):
  path, root, _ = ann
  src = data.AnnotationSource.from_file(path, root)
  it = iter(train(src))
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  rest = take(it, 5)
  it2 = iter(train(src))
  it2.set_state(state)
  assert_same(take(it2, 5), rest)


def test_skips_are_counted_and_logged(ann, caplog):
  path, root, _ = ann
  src = data.AnnotationSource.from_file(path, root)
  with caplog.at_level(logging.WARNING, logger="blip2_jax.data"):
    batches = list(iter(train(src, shuffle=False, num_epochs=1)))
  assert len(batches) == N_GOOD // 2
  assert sum(int(b["num_skipped"]) for b in batches) == 2
  assert {int(v) for b in batches for v in b["index"]} == set(range(12)) - {3, 7}
  text = caplog.text
  assert "bad.jpg" in text and "missing.png" in text


def test_no_readable_image_raises_instead_of_spinning(ann):
  path, root, _ = ann
  src = data.AnnotationSource.from_file(path, root / "wrong_dir")
  with pytest.raises(RuntimeError, match="in a row could not be read"):
    next(iter(train(src)))


def test_hf_tokenizer_right_pads(tmp_path):
  from transformers import BertTokenizer
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "dog", "photo", "of"]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  tok = BertTokenizer.from_pretrained(str(tmp_path))  # local directory, no hub
  tok.padding_side = "left"  # ignored: training pads on the right
  f = data.make_tokenize_fn(tok, 6)
  out = f("a photo of a dog")
  np.testing.assert_array_equal(out["input_ids"], [2, 4, 6, 7, 4, 3])  # truncated to 6 incl. [SEP]
  out = f("a dog")
  np.testing.assert_array_equal(out["input_ids"], [2, 4, 5, 3, 0, 0])
  np.testing.assert_array_equal(out["attention_mask"], [1, 1, 1, 1, 0, 0])


# ----------------------------------------------------------------------------------------
# eval pipeline
# ----------------------------------------------------------------------------------------
def test_eval_loader_pads_masks_and_covers_once(ann):
  path, root, _ = ann
  src = data.AnnotationSource.from_file(path, root)
  proc = ImageProcessor(SIZE)
  rows, skipped = [], 0
  for i in range(2):
    it = data.make_eval_loader(src, global_batch_size=4, image_size=SIZE, tokenize_fn=toy_tokenize,
                               shard_options=grain.sharding.ShardOptions(i, 2), read_options=FAST)
    batches = list(it)
    assert len(batches) == data.eval_num_batches(12, 4, 2) == 3
    for b in batches:
      skipped += int(b["num_skipped"])
      for k in range(2):
        if b["mask"][k]:
          rows.append(int(b["index"][k]))
          np.testing.assert_array_equal(b["image"][k], proc(src[int(b["index"][k])]["image"])[0])
          np.testing.assert_array_equal(b["input_ids"][k], toy_tokenize(data.pre_caption(
              src[int(b["index"][k])]["caption"]))["input_ids"])
        else:
          assert not b["image"][k].any()
  assert sorted(rows) == sorted(set(range(12)) - {3, 7}) and skipped == 2
  # 11 records, one process, batch 4: last batch padded
  b = list(data.make_eval_loader(src, global_batch_size=4, image_size=SIZE, read_options=FAST,
                                 shard_options=grain.sharding.NoSharding()))
  assert [int(x["mask"].sum()) for x in b] == [3, 3, 4] and b[-1]["index"].tolist() == [8, 9, 10, 11]
  assert "input_ids" not in b[0] and "text" not in b[0]


# ----------------------------------------------------------------------------------------
# ArrayRecord
# ----------------------------------------------------------------------------------------
def test_convert_round_trip(ann, tmp_path, capsys):
  path, root, recs = ann
  out = tmp_path / "shards" / "coco"
  rc = convert_cli.main(["--annotations", str(path), "--images-dir", str(root), "--output", str(out),
                         "--num-shards", "3", "--no-progress"])
  assert rc == 0
  err = capsys.readouterr().err
  assert "bad.jpg" in err and "missing.png" in err
  assert "bad.jpg" in (tmp_path / "shards" / "coco.skipped.txt").read_text()
  assert len(data.shard_paths(out)) == 3
  ar = data.ArrayRecordSource(out)
  good = [r for r in recs if "bad" not in r["image"] and "missing" not in r["image"]]
  assert len(ar) == len(good) == N_GOOD
  r = ar[4]
  assert r["image"] == (root / good[4]["image"]).read_bytes()
  assert r["caption"] == good[4]["caption"] and r["image_id"] == good[4]["image_id"]
  assert r["image_path"] == good[4]["image"]
  # the same records through either source give the same batches
  a = take(iter(train(ar, seed=3)), 4)
  b = take(iter(train(data.AnnotationSource(good, root), seed=3)), 4)
  assert_same(a, b)


def test_array_record_expand_captions(tmp_path):
  make_images(tmp_path, 2)
  recs = [{"image": "imgs/im0.png", "caption": ["a", "b", "c"]}, {"image": "imgs/im1.png", "caption": "d"}]
  (tmp_path / "a.json").write_text(json.dumps(recs))
  convert_mod.convert(str(tmp_path / "a.json"), str(tmp_path), str(tmp_path / "o"), progress=False)
  assert len(data.ArrayRecordSource(tmp_path / "o")) == 2
  ex = data.ArrayRecordSource(tmp_path / "o", expand_captions=True)
  assert [ex[i]["caption"] for i in range(len(ex))] == ["a", "b", "c", "d"]
  res = convert_mod.convert(str(tmp_path / "a.json"), str(tmp_path), str(tmp_path / "e"), expand=True,
                            progress=False)
  assert res["written"] == 4
  # a caption list in training: one caption drawn per step, deterministic
  batches = take(iter(train(data.ArrayRecordSource(tmp_path / "o"), global_batch_size=1, shuffle=False)), 8)
  first = {toy_tokenize(c)["input_ids"].tobytes() for c in "abc"}
  drawn = {b["input_ids"][0].tobytes() for b in batches if b["index"][0] == 0}
  assert drawn <= first and len(drawn) > 1
  with pytest.raises(ValueError, match="magic"):
    sources.deserialize_record(b"nope")


# ----------------------------------------------------------------------------------------
# TFDS
# ----------------------------------------------------------------------------------------
def test_tfds_record_fn_and_pipeline():
  """The default record_fn on a coco_captions-shaped example, through the train pipeline (no tfds needed)."""
  ex = {"image": np.zeros((20, 25, 3), np.uint8), "image/id": np.int64(7), "image/filename": b"x.jpg",
        "captions": {"text": np.array([b"A cat.", b"two"], dtype=object), "id": np.array([1, 2])}}
  rec = sources.tfds_to_record(ex)
  assert rec["caption"] == ["A cat.", "two"] and rec["image_id"] == 7 and rec["image_path"] == "x.jpg"
  src = sources.TfdsSource.__new__(sources.TfdsSource)  # bypass tfds.data_source: a list is random access
  src._ds, src.record_fn, src.name, src.split = [ex, ex], sources.tfds_to_record, "fake", "train"
  b = take(iter(train(src, global_batch_size=2)), 1)[0]
  assert b["image"].shape == (2, SIZE, SIZE, 3) and int(b["num_skipped"]) == 0


def test_tfds_source(tmp_path):
  try:
    import tensorflow_datasets as tfds  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
      data.TfdsSource("coco_captions", data_dir=str(tmp_path))
    pytest.skip("tensorflow_datasets is not installed: only the missing-package error was checked")
  class Blip2JaxTinyCaptions(tfds.core.GeneratorBasedBuilder):
    """coco_captions-shaped; the image is a raw uint8 Tensor so building needs no TensorFlow."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="bytes"),
          "image/id": np.int64, "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(4):
        yield i, {"image": np.full((20 + i, 24, 3), 40 * i, np.uint8), "image/id": i,
                  "captions": {"text": [f"Cap {i} A.", f"cap {i} b"]}}

  # not prepared yet: a clear error naming the data_dir (and nothing is downloaded)
  with pytest.raises(FileNotFoundError, match="not available in " + str(tmp_path)) as e:
    data.TfdsSource("blip2_jax_tiny_captions", split="train", data_dir=str(tmp_path))
  print(e.value)
  Blip2JaxTinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  src = data.TfdsSource("blip2_jax_tiny_captions", split="train", data_dir=str(tmp_path))
  assert len(src) == 4
  for j in range(4):  # tfds orders examples by a hash of their key
    rec = src[j]
    i = rec["image_id"]
    assert rec["image"].shape == (20 + i, 24, 3) and rec["caption"] == [f"Cap {i} A.", f"cap {i} b"]
  batches = take(iter(train(src, global_batch_size=4, num_epochs=1)), 1)
  assert sorted(batches[0]["index"].tolist()) == [0, 1, 2, 3]


def test_worker_processes_resume(ann):
  path, root, _ = ann
  src = data.AnnotationSource.from_file(path, root)
  it = iter(train(src, worker_count=2))
  take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  rest = take(it, 3)
  it.close()
  it2 = iter(train(src, worker_count=2))
  it2.set_state(state)
  again = take(it2, 3)
  it2.close()
  assert_same(again, rest)
