"""Image-text inputs as users hold them, written for the CapFilt data tests: img2dataset webdataset
shards (tar + parquet + stats beside it), annotation JSONL with an image folder, ArrayRecord files."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import PIL.Image


def image_bytes(seed: int, fmt: str = "JPEG", size=(24, 20)) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
  return buf.getvalue()


def write_tar(path, members) -> None:
  """members: [(name, bytes)] in order, as webdataset's TarWriter writes them."""
  with tarfile.open(path, "w") as tf:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size, info.mtime = len(data), 0
      tf.addfile(info, io.BytesIO(data))


def sample_members(key: str, seed: int, *, fmt="jpg", text=None, caption=None, url=True, image=True):
  """img2dataset's members of one sample: KEY.<fmt>, KEY.txt, KEY.json (each optional)."""
  out = []
  if image:
    data = image if isinstance(image, bytes) else image_bytes(seed, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
    out.append((f"{key}.{fmt}", data))
  if text is not None:
    out.append((f"{key}.txt", text.encode("utf-8")))
  if caption is not None or url:
    meta = {"key": key, "status": "success", "width": 24, "height": 20}
    if url:
      meta["url"] = f"http://example.com/{key}.jpg"
    if caption is not None:
      meta["caption"] = caption
    out.append((f"{key}.json", json.dumps(meta).encode()))
  return out


# the samples of shard 00000: (key, what it holds)
SHARD0 = [
    ("000000000", dict(fmt="jpg", text="a red car", caption="a red car")),         # txt == json caption
    ("000000001", dict(fmt="png", caption="a dog on grass")),                       # json caption only
    ("000000002", dict(fmt="webp", text="a bowl of fruit", url=False)),             # txt only
    ("000000003", dict(fmt="jpg")),                                                 # no text at all
    ("000000004", dict(fmt="jpg", text="the lost image", image=False)),             # no image
    ("000000005", dict(fmt="jpg", text="corrupt", image=b"<html>404</html>")),  # not an image
    ("000000006", dict(fmt="jpg", text="web text", caption="another web text")),    # two web texts
]


def write_img2dataset(root, shards: int = 2, per_shard: int = 5) -> list[str]:
  """An img2dataset output folder: NNNNN.tar (+ .parquet, _stats.json). Shard 0 holds SHARD0; the
  others plain jpg + txt + json samples. Returns every sample key that has an image."""
  os.makedirs(root, exist_ok=True)
  keys = []
  for s in range(shards):
    samples = SHARD0 if s == 0 else [(f"{s:05d}{i:04d}", dict(text=f"photo {s} {i}", caption=f"photo {s} {i}"))
                                     for i in range(per_shard)]
    members = []
    for i, (key, kw) in enumerate(samples):
      members += sample_members(key, 100 * s + i, **kw)
      if kw.get("image", True) is not False:
        keys.append(key)
    write_tar(os.path.join(root, f"{s:05d}.tar"), members)
    with open(os.path.join(root, f"{s:05d}_stats.json"), "w") as f:
      json.dump({"count": len(samples), "successes": len(samples), "failed_to_download": 0}, f)
    with open(os.path.join(root, f"{s:05d}.parquet"), "wb") as f:
      f.write(b"PAR1 not read by anyone PAR1")
  return keys


def write_annotations(root, n: int = 6) -> str:
  """train.jsonl + images/: n images, image 1 with three caption records (LAVIS style), a record whose
  image file is missing and one without an image path. Returns the JSONL path."""
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  lines = []
  for i in range(n):
    with open(os.path.join(root, "images", f"im{i}.png"), "wb") as f:
      f.write(image_bytes(i, "PNG"))
    caps = [f"picture {i}"] + ([f"picture {i} again", f"picture {i} once more"] if i == 1 else [])
    lines += [{"image": f"images/im{i}.png", "caption": c, "image_id": i} for c in caps]
  lines.insert(2, {"image": "images/missing.png", "caption": "gone", "image_id": 99})
  lines.append({"caption": "no image here"})
  path = os.path.join(root, "train.jsonl")
  with open(path, "w") as f:
    f.writelines(json.dumps(x) + "\n" for x in lines)
  return path
