"""CapFilt's inputs: img2dataset webdataset tars (data/webdataset.py), annotation JSONL + images and
ArrayRecord files as input shards with one interface (data/input_shards.py); damaged tars, skip
reasons, names, and the split of shards over processes."""
import gzip
import io
import os
import tarfile

import pytest

from blip2_jax.core.errors import UsageError
from blip2_jax.data import convert, input_shards, sources
from blip2_jax.data.input_shards import list_input_shards, shards_for_process
from blip2_jax.data.processing import ImageLoadError
from blip2_jax.data.transforms import decode_image
from blip2_jax.data.webdataset import TarGroups, split_key

from image_text_files import SHARD0, image_bytes, write_annotations, write_img2dataset, write_tar


def _samples(shard):
  stream = shard.samples()
  return list(stream), stream


def test_img2dataset_shards(tmp_path):
  keys = write_img2dataset(tmp_path / "dl", shards=2, per_shard=3)
  shards = list_input_shards(tmp_path / "dl")
  assert [(s.name, s.format, s.size) for s in shards] == [("00000", "webdataset", 7), ("00001", "webdataset", 3)]
  # a glob and the tar paths give the same shards (the parquet and stats files are not inputs)
  assert list_input_shards(str(tmp_path / "dl" / "*")) == shards
  assert list_input_shards([tmp_path / "dl" / "00000.tar", tmp_path / "dl" / "00001.tar"]) == shards
  got, stream = _samples(shards[0])
  assert stream.damage is None and stream.read == len(SHARD0) == len(got)
  by = {s.key: s for s in got}
  assert [s.key for s in got] == [k for k, _ in SHARD0]  # tar order
  assert by["000000000"].web_texts == ["a red car"]  # .txt and .json caption, equal: once
  assert by["000000001"].web_texts == ["a dog on grass"] and by["000000001"].image[:8] == b"\x89PNG\r\n\x1a\n"
  assert by["000000002"].web_texts == ["a bowl of fruit"] and by["000000002"].image[:4] == b"RIFF"
  assert by["000000003"].web_texts == [] and by["000000003"].error is None  # an image without text: a sample
  assert by["000000004"].image is None and by["000000004"].error == input_shards.NO_IMAGE
  assert by["000000006"].web_texts == ["web text", "another web text"]
  assert by["000000000"].meta == {"url": "http://example.com/000000000.jpg", "img2dataset_key": "000000000"}
  assert by["000000000"].image == image_bytes(0, "JPEG")
  # the undecodable image is found by decoding, and named
  with pytest.raises(ImageLoadError) as e:
    decode_image(by["000000005"].image, name="000000005")
  assert input_shards.image_skip_reason(e.value) == input_shards.NOT_AN_IMAGE
  cut = image_bytes(1, "JPEG", size=(64, 64))
  with pytest.raises(ImageLoadError) as e:
    decode_image(cut[:len(cut) // 2])
  assert input_shards.image_skip_reason(e.value) == input_shards.TRUNCATED_IMAGE
  all_keys = [s.key for sh in shards for s in _samples(sh)[0] if s.error is None]
  assert sorted(all_keys) == sorted(keys)


def test_member_keys_as_webdataset_groups_them(tmp_path):
  assert split_key("part/000012.seg.PNG") == ("part/000012", "seg.png")
  assert split_key("a.b.c") == ("a", "b.c") and split_key("noext") == ("noext", "")
  write_tar(tmp_path / "x.tar", [("d/k1.jpg", image_bytes(0)), ("d/k1.txt", b" hi \n"), ("d/k2.jpeg", image_bytes(1)),
                                 ("d/k2.cls", b"3")])
  got, _ = _samples(list_input_shards(tmp_path / "x.tar")[0])
  assert [(s.key, s.web_texts, s.image is not None) for s in got] == [("d/k1", ["hi"], True), ("d/k2", [], True)]


def _tar_of(n):
  members = []
  for i in range(n):
    members += [(f"{i:04d}.jpg", image_bytes(i)), (f"{i:04d}.txt", f"text {i}".encode())]
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tf:
    offsets = []
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
      offsets.append(tf.offset)  # where each member ends (its data padded to 512)
  return buf.getvalue(), offsets


@pytest.mark.parametrize("where", ["inside image data", "inside a header", "between members", "end block missing"])
def test_truncated_tar_yields_what_came_before(tmp_path, where):
  raw, ends = _tar_of(6)
  # sample i spans members 2i (jpg) and 2i+1 (txt); ends[m] is where member m (padded) ends
  cut = {"inside image data": ends[6] + 512 + 100,  # sample 3's jpg data (samples 0-2 whole)
         "inside a header": ends[7] + 200,          # the header of sample 4's jpg
         "between members": ends[8],                 # right after sample 4's jpg: its txt is gone
         "end block missing": ends[11]}[where]       # every member, no end-of-archive block
  (tmp_path / "cut.tar").write_bytes(raw[:cut])
  [shard] = list_input_shards(tmp_path / "cut.tar")
  got, stream = _samples(shard)
  n = {"inside image data": 3, "inside a header": 3, "between members": 4, "end block missing": 5}[where]
  # the sample being read when the damage struck is dropped: it may be incomplete
  assert [s.key for s in got] == [f"{i:04d}" for i in range(n)]
  assert all(s.web_texts == [f"text {int(s.key)}"] for s in got)
  d = stream.damage
  assert d is not None and d.samples == n and d.offset <= cut
  line = d.describe(shard.name)
  assert line.startswith(f"cut: damaged after {n} sample(s), at byte {d.offset}: ") and "\n" not in line
  # the whole tar reads without damage
  (tmp_path / "whole.tar").write_bytes(raw)
  got, stream = _samples(list_input_shards(tmp_path / "whole.tar")[0])
  assert len(got) == 6 and stream.damage is None


def test_truncated_gzip_tar_and_garbage(tmp_path):
  raw, _ = _tar_of(6)
  gz = gzip.compress(raw)
  (tmp_path / "a.tar.gz").write_bytes(gz)
  got, stream = _samples(TarGroupsShard(tmp_path / "a.tar.gz"))
  assert len(got) == 6 and stream.damage is None
  (tmp_path / "b.tar.gz").write_bytes(gz[:len(gz) // 2])
  got, stream = _samples(TarGroupsShard(tmp_path / "b.tar.gz"))
  assert 0 < len(got) < 6 and stream.damage.samples == len(got)
  (tmp_path / "c.tar").write_bytes(b"this is not a tar file at all" * 40)
  groups = TarGroups(tmp_path / "c.tar")
  assert list(groups) == [] and groups.damage.samples == 0 and "ReadError" in groups.damage.error


def TarGroupsShard(path):  # noqa: N802 - a shard of one tar
  return list_input_shards(path)[0]


def test_annotation_file_shards(tmp_path):
  path = write_annotations(tmp_path, n=5)
  shards = list_input_shards(path, records_per_shard=2)
  assert [(s.name, s.format, s.size, s.start, s.stop) for s in shards] == [
      ("train-part00000", "annotations", 2, 0, 2), ("train-part00001", "annotations", 2, 2, 4),
      ("train-part00002", "annotations", 2, 4, 6), ("train-part00003", "annotations", 1, 6, 7)]
  got = [s for sh in shards for s in _samples(sh)[0]]
  by = {s.key: s for s in got}
  assert len(got) == len(by) == 7  # 5 images (image 1's three records are one sample), a missing file, no path
  assert by["images/im1.png"].web_texts == ["picture 1", "picture 1 again", "picture 1 once more"]
  assert by["images/im1.png"].meta == {"image_id": 1, "image_path": "images/im1.png"}
  assert by["images/im3.png"].image == (tmp_path / "images" / "im3.png").read_bytes()
  assert by["images/missing.png"].error == input_shards.IMAGE_NOT_FOUND
  assert by["record 9"].error == input_shards.NO_IMAGE_PATH and by["record 9"].web_texts == ["no image here"]
  # images under another directory
  os.rename(tmp_path / "images", tmp_path / "elsewhere")
  os.makedirs(tmp_path / "imgs")
  os.rename(tmp_path / "elsewhere", tmp_path / "imgs" / "images")
  got = _samples(list_input_shards(path, images_dir=tmp_path / "imgs")[0])[0]
  assert got[0].error is None and got[0].image == (tmp_path / "imgs" / "images" / "im0.png").read_bytes()


def test_array_record_shards_keep_an_image_whole(tmp_path):
  path = write_annotations(tmp_path, n=6)
  convert.convert(path, str(tmp_path), str(tmp_path / "ar" / "train"), num_shards=1, progress=False)
  # records: im0, im1 x3 (one per caption), im2 .. im5
  whole = list_input_shards(tmp_path / "ar")
  assert [(s.name, s.size) for s in whole] == [("train-00000-of-00001", 8)]
  for per_shard in (1, 2, 3, 8):
    shards = list_input_shards(tmp_path / "ar", records_per_shard=per_shard)
    got = [s for sh in shards for s in _samples(sh)[0]]
    assert [s.key for s in got] == [f"images/im{i}.png" for i in range(6)], per_shard
    assert got[1].web_texts == ["picture 1", "picture 1 again", "picture 1 once more"]
    assert got[4].image == (tmp_path / "images" / "im4.png").read_bytes()
    assert got[4].meta == {"image_id": 4, "image_path": "images/im4.png"}
  assert [s.name for s in list_input_shards(tmp_path / "ar", records_per_shard=3)] == [
      f"train-00000-of-00001-part{k:05d}" for k in range(3)]
  # a file that is not an ArrayRecord file: refused up front
  raw = (tmp_path / "ar" / "train-00000-of-00001.array_record").read_bytes()
  (tmp_path / "bad.array_record").write_bytes(b"\0" * len(raw))
  with pytest.raises(UsageError, match="bad.array_record: not a readable ArrayRecord file"):
    list_input_shards(tmp_path / "bad.array_record")


def test_corrupt_array_record_reports_how_far_it_got(tmp_path):
  from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
  path = str(tmp_path / "c.array_record")
  w = ArrayRecordWriter(path, "group_size:1")
  for i in range(8):
    w.write(sources.serialize_record({"image": f"im{i}.jpg", "caption": f"c{i}"}, bytes([i]) * 3000))
  w.close()
  raw = open(path, "rb").read()
  for pos in range(0, len(raw) // 2, 4):  # the first byte flip that breaks a record after the first
    bad = bytearray(raw)
    bad[pos] ^= 0xFF
    (tmp_path / "d.array_record").write_bytes(bad)
    r = ArrayRecordReader(str(tmp_path / "d.array_record"))
    if r.num_records() == 8 and _first_unreadable(r) not in (None, 0):
      break
  else:
    pytest.fail("no byte flip breaks a record")
  first_bad = _first_unreadable(r)
  got, stream = _samples(list_input_shards(tmp_path / "d.array_record")[0])
  assert [s.key for s in got] == [f"im{i}.jpg" for i in range(first_bad)]
  assert stream.damage.samples == first_bad and stream.damage.record == first_bad
  assert f"at record {first_bad}: RuntimeError" in stream.damage.describe("d")


def _first_unreadable(reader):
  for i in range(reader.num_records()):
    try:
      reader.read([i])
    except RuntimeError:
      return i
  return None


def test_bad_inputs_are_one_line_usage_errors(tmp_path):
  write_img2dataset(tmp_path / "dl", shards=1)
  (tmp_path / "empty").mkdir()
  (tmp_path / "notes.txt").write_text("x")
  for inputs, message in [
      (tmp_path / "nope", f"input {tmp_path / 'nope'}: no such file or directory"),
      (tmp_path / "empty", "holds no .tar (img2dataset webdataset) or .array_record files"),
      (str(tmp_path / "dl" / "*.p*"), "no .tar, .jsonl / .json or .array_record file matches"),
      (tmp_path / "notes.txt", "notes.txt is not a .tar (webdataset), .jsonl / .json (annotations) or .array_record"),
      ([], "no input given")]:
    with pytest.raises(UsageError, match=None) as e:
      list_input_shards(inputs)
    assert message in str(e.value) and "\n" not in str(e.value)
  (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\nnot json\n')
  with pytest.raises(UsageError, match=r"bad.jsonl:2: invalid JSON"):
    list_input_shards(tmp_path / "bad.jsonl")
  with pytest.raises(UsageError, match="records per shard 0: must be at least 1"):
    list_input_shards(tmp_path / "dl", records_per_shard=0)
  # names: the path below the inputs' common directory; the same file given twice is one shard
  for d in ("other", "a-b", "a"):
    os.makedirs(tmp_path / d, exist_ok=True)
  write_tar(tmp_path / "other" / "00000.tar", [])
  assert [s.name for s in list_input_shards([tmp_path / "dl", tmp_path / "other", tmp_path / "dl" / "00000.tar"])] == [
      "dl-00000", "other-00000"]
  write_tar(tmp_path / "a-b" / "00000.tar", [])
  write_tar(tmp_path / "a" / "b-00000.tar", [])
  with pytest.raises(UsageError, match="would both name their output 'a-b-00000'"):
    list_input_shards([tmp_path / "a-b", tmp_path / "a"])


def test_shards_for_process_covers_each_shard_once(tmp_path):
  write_img2dataset(tmp_path, shards=7, per_shard=1)
  shards = list_input_shards(tmp_path)
  for count in (1, 2, 3, 4, 7, 9):
    parts = [shards_for_process(shards, i, count) for i in range(count)]
    names = [s.name for p in parts for s in p]
    assert sorted(names) == sorted(s.name for s in shards) and len(names) == len(shards)
    assert parts == [shards_for_process(list_input_shards(tmp_path), i, count) for i in range(count)]  # stable
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
  with pytest.raises(ValueError):
    shards_for_process(shards, 2, 2)


def test_sample_seed_depends_on_key_and_seed_only():
  seeds = {input_shards.sample_seed(0, f"{i:09d}") for i in range(1000)}
  assert len(seeds) == 1000 and all(0 <= s < 2**32 for s in seeds)
  assert input_shards.sample_seed(0, "000000012") == input_shards.sample_seed(0, "000000012")
  assert input_shards.sample_seed(0, "000000012") != input_shards.sample_seed(1, "000000012")
  # the same in another Python process: test_capfilt_shards.py's killed writer puts it in its captions
