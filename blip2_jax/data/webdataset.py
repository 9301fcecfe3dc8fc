"""img2dataset's webdataset shards, read as a stream with the standard library's `tarfile`.

img2dataset (`--output_format webdataset`) writes, for each shard, `NNNNN.tar` and beside it
`NNNNN.parquet` (the url table) and `NNNNN_stats.json` (counts: "count", "successes", ...). The
tar holds each downloaded sample as consecutive members sharing a key:
    000010005.jpg    the image, re-encoded by img2dataset (`--encode_format`: jpg, png or webp)
    000010005.txt    the caption column (the web alt text), UTF-8
    000010005.json   {"url", "key", "caption", "status", "width", "height", "original_width", ...}
A member's key is its path up to the first dot of its file name, as the webdataset package groups
members ("part/a.b.jpg": key "part/a", extension "b.jpg"); the extension is compared lower-cased.

`TarGroups(path)` yields `(key, {extension: bytes})` per sample in tar order: one pass front to
back, mode "r|*" (plain, gzip, bzip2 or xz), memory bounded by one sample. A damaged tar never
raises: the samples before the damage are yielded, the sample being read when it struck is
dropped (it may miss members), and `damage` then says how far the stream got: samples yielded,
the byte offset (in the uncompressed stream) where the last intact member ends, and the error.
A plain tar cut exactly between two members reads like a shorter archive; it is told apart by its
missing end-of-archive block (512 zero bytes, which every tar writer appends).
"""
from __future__ import annotations

import dataclasses
import os
import tarfile
from typing import Iterator

BLOCK = 512  # tar's block size; an archive ends with (at least) one block of zeros
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


@dataclasses.dataclass(frozen=True)
class Damage:
  """How far a damaged shard was read: `samples` yielded before the damage, the byte `offset` where
  the last intact part ends (tar: in the uncompressed stream; ArrayRecord: None, see `record`), the
  index of the first unreadable `record` (ArrayRecord; None for a tar), and the `error` text."""
  samples: int
  offset: int | None
  error: str
  record: int | None = None

  def describe(self, shard: str) -> str:
    """One line for the log: the shard, how far it got and what went wrong."""
    where = f"record {self.record}" if self.record is not None else f"byte {self.offset}"
    return f"{shard}: damaged after {self.samples} sample(s), at {where}: {self.error}; its other samples are lost"


def split_key(member_name: str) -> tuple[str, str]:
  """"dir/000012.seg.png" -> ("dir/000012", "seg.png"): webdataset's key and lower-cased extension."""
  directory, _, base = member_name.rpartition("/")
  stem, _, ext = base.partition(".")
  return (f"{directory}/{stem}" if directory else stem), ext.lower()


class TarGroups:
  """Iterates a webdataset tar as (key, {extension: bytes}); `damage` is set once it stops early."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self.damage: Damage | None = None

  def __iter__(self) -> Iterator[tuple[str, dict[str, bytes]]]:
    self.damage = None
    key, members, yielded, intact = None, {}, 0, 0
    try:
      with tarfile.open(self.path, mode="r|*") as tf:
        for info in tf:
          tf.members = []  # a stream never needs the index tarfile keeps (it would grow per member)
          if not info.isfile():
            continue
          k, ext = split_key(info.name)
          data = tf.extractfile(info).read()
          intact = info.offset_data + info.size
          if k != key and key is not None:
            yielded += 1
            yield key, members
            members = {}
          key = k
          members.setdefault(ext, data)
    except Exception as e:  # noqa: BLE001 - tarfile, gzip, zlib, lzma and OS errors alike: a damaged shard
      self.damage = Damage(yielded, intact, f"{type(e).__name__}: {e}")
      return
    if key is not None and self._cut_between_members(intact):
      self.damage = Damage(yielded, intact, "no end-of-archive block (the file is cut short)")
      return
    if key is not None:
      yield key, members

  def _cut_between_members(self, end: int) -> bool:
    """A plain tar whose last member is not followed by a zero block."""
    with open(self.path, "rb") as f:
      if f.read(6).startswith(_COMPRESSED_MAGIC):
        return False  # a cut compressed stream fails in the decompressor instead
      f.seek(end + (-end % BLOCK))
      tail = f.read(BLOCK)
    return len(tail) < BLOCK or tail.count(0) != BLOCK
