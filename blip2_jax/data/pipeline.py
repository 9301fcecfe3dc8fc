"""Grain input pipelines for BLIP-2 training and evaluation: deterministic, resumable, sharded by process.

    loader = make_train_loader(src, global_batch_size=256, image_size=224, tokenizer=bert_tok, seed=0)
    it = iter(loader)                       # a grain DatasetIterator
    batch = next(it)                        # numpy, per-process batch = global_batch_size // process_count
    state = it.get_state()                  # JSON-able dict: store it in the checkpoint
    it.set_state(state)                     # after a restart: continues with exactly the next batch

Train pipeline (grain.MapDataset, one per process):
    range(len(source)) -> shard (interleaved, equal sizes) -> shuffle(seed) -> repeat(num_epochs)
    -> random_map(decode, RandomResizedCrop + flip + CLIP normalise, pre_caption, tokenize)
    -> to_iter_dataset (threads) -> skip counting -> batch(drop_remainder) [-> mp_prefetch(workers)]
Each epoch is shuffled and augmented differently (grain folds the epoch into the seeds); the
random_map generator is seeded from (seed, process) and the element's position, so a batch depends
only on the seed, the shard, the step and `worker_count`, never on timing or the thread count.
(With worker_count > 0 grain gives each worker a slice of the stream and interleaves their batches,
so changing worker_count changes the order; keep it fixed when resuming from a saved state.)

Bad records: a record whose image is missing, truncated or undecodable, or whose caption is empty after
`pre_caption` ("...", a zero-width space: nothing to train on), is skipped, never a crash and never
trained on. The map returns a marker (and logs a warning naming the record); the skip-counting stage drops the
marker and adds 1 to the "num_skipped" field of the next example it yields. Every batch therefore
carries `batch["num_skipped"]`, an int32 scalar: the records skipped while assembling that batch.
The training loop pops it before the step and adds it to its logged metrics (summed over
processes for a global count). Skips after the last full batch of a finite pipeline are not
reported (that tail is dropped with drop_remainder anyway).

Batches (train): "image" (B, S, S, 3) float32 NHWC, "input_ids" / "attention_mask" (B, max_txt_len)
int32 padded on the right, "index" (B,) int64 source indices, "num_skipped" () int32. Without a
tokenizer the pre-processed captions come as "text" (B,) str instead of the token arrays.

Eval (`make_eval_loader`): no shuffle, no augmentation (`processing.ImageProcessor`), one pass,
every record exactly once over all processes; the last batch is padded and "mask" (B,) int32 marks
real rows (0 for padding and for skipped images). All processes get the same number of batches.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import grain
import numpy as np

from blip2_jax.data.processing import ImageLoadError, ImageProcessor
from blip2_jax.data.transforms import MAX_WORDS, decode_image, is_blank, pre_caption, train_image_transform

log = logging.getLogger("blip2_jax.data")

SKIPPED = "num_skipped"
_MARKER = "__skipped__"


# ----------------------------------------------------------------------------------------
# text
# ----------------------------------------------------------------------------------------
def make_tokenize_fn(tokenizer, max_txt_len: int = 32, *, suffix: str = "",
                     add_special_tokens: bool = True) -> Callable[[str], dict[str, np.ndarray]]:
  """A HF tokenizer -> fn(text) -> {"input_ids", "attention_mask"} int32 (max_txt_len,), right-padded.

  Truncates to max_txt_len tokens (after adding `suffix`, e.g. "\\n" for BLIP-2 OPT captions, as
  LAVIS does); pads with the tokenizer's pad id (else EOS, else 0) whatever its padding_side.
  """
  pad = tokenizer.pad_token_id
  if pad is None:
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
  return _Tokenize(tokenizer, int(max_txt_len), suffix, add_special_tokens, int(pad))


class _Tokenize:  # a class, not a closure, so it pickles into grain worker processes

  def __init__(self, tokenizer, max_len, suffix, add_special_tokens, pad):
    self.tokenizer, self.max_len, self.suffix = tokenizer, max_len, suffix
    self.add_special_tokens, self.pad = add_special_tokens, pad

  def __call__(self, text: str) -> dict[str, np.ndarray]:
    ids = self.tokenizer(text + self.suffix, add_special_tokens=self.add_special_tokens, truncation=True,
                         max_length=self.max_len)["input_ids"][:self.max_len]
    out = np.full((self.max_len,), self.pad, np.int32)
    mask = np.zeros((self.max_len,), np.int32)
    out[:len(ids)], mask[:len(ids)] = ids, 1
    return {"input_ids": out, "attention_mask": mask}


def caption_text(record: dict, rng: np.random.Generator | None) -> str:
  """The record's caption; a caption list gives a random one (train) or the first (eval, rng None)."""
  cap = record.get("caption")
  if isinstance(cap, (list, tuple)):
    if not cap:
      raise ValueError("empty caption list")
    cap = cap[int(rng.integers(len(cap)))] if rng is not None else cap[0]
  if not isinstance(cap, str):
    raise ValueError(f"record has no caption string: keys {sorted(record)}")
  return cap


# ----------------------------------------------------------------------------------------
# per-example maps
# ----------------------------------------------------------------------------------------
def _name(record: dict, index: int) -> str:
  p = record.get("image_path")
  if p is None and isinstance(record.get("image"), str):
    p = record["image"]
  return f"{p} (record {index})" if p is not None else f"record {index}"


class _Example:
  """index -> example dict, or a skip marker when the image cannot be decoded."""

  def __init__(self, source, image_size, text_fn, tokenize_fn, max_words, train, processor=None):
    self.source, self.image_size, self.text_fn = source, int(image_size), text_fn
    self.tokenize_fn, self.max_words, self.train, self.processor = tokenize_fn, max_words, train, processor

  def _text(self, record, rng):
    if self.text_fn is None:
      return {}
    text = self.text_fn(record, rng)
    if isinstance(text, dict):  # several raw fields (instruction / response): kept as they are
      if self.tokenize_fn is not None:
        raise ValueError("a text_fn returning several fields cannot be combined with a tokenizer")
      return {k: str(v) for k, v in text.items()}
    cleaned = pre_caption(text, self.max_words)
    if is_blank(cleaned):
      raise _EmptyCaption(f"caption {text!r} is empty after cleaning (pre_caption)")
    return self.tokenize_fn(cleaned) if self.tokenize_fn is not None else {"text": cleaned}

  def __call__(self, index, rng: np.random.Generator | None = None) -> dict:
    index = int(index)
    record = self.source[index]
    try:
      im = decode_image(record["image"], name=_name(record, index))
    except (ImageLoadError, KeyError) as e:
      log.warning("skipping image %s: %s", _name(record, index), e)
      return {_MARKER: _name(record, index), "error": str(e)}
    if self.train:
      image = train_image_transform(im, rng, self.image_size)
    else:
      image = self.processor.preprocess_one(im)
    try:
      text = self._text(record, rng)
    except _EmptyCaption as e:
      log.warning("skipping record %s: %s", _name(record, index), e)
      return {_MARKER: _name(record, index), "error": str(e)}
    return {"image": image, **text, "index": np.int64(index)}


class _EmptyCaption(ValueError):
  pass


class _TrainMap(grain.transforms.RandomMap):

  def __init__(self, example: _Example):
    self.example = example

  def random_map(self, index, rng):
    return self.example(index, rng)


# ----------------------------------------------------------------------------------------
# skip counting
# ----------------------------------------------------------------------------------------
class _SkipCountingIterator(grain.DatasetIterator):
  """Drops skip markers; the next example yielded carries how many were dropped before it.

  Between two `next` calls no count is pending, so the parent's state is the whole state.
  Raises once `max_consecutive` markers come in a row (no image of a whole shard readable:
  a wrong images_dir, not a few bad files), rather than spinning forever on a repeated dataset.
  """

  def __init__(self, parent, max_consecutive: int):
    super().__init__(parent)
    self._max = max_consecutive

  def __next__(self):
    n = 0
    while True:
      x = next(self._parent)
      if _MARKER in x:
        n += 1
        if n >= self._max:
          raise RuntimeError(f"{n} images in a row could not be read or had no caption (the last: {x[_MARKER]}: "
                             f"{x['error']}); check the image paths / images_dir and the captions")
        continue
      x[SKIPPED] = np.int32(n)
      return x

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _SkipCounting(grain.IterDataset):

  def __init__(self, parent, max_consecutive: int):
    super().__init__(parent)
    self._max = max_consecutive

  def __iter__(self):
    return _SkipCountingIterator(self._parent.__iter__(), self._max)


def _stack(examples: Sequence[dict]) -> dict:
  """Batch: stack every field, sum the skip counts into one scalar."""
  out = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != SKIPPED}
  out[SKIPPED] = np.int32(sum(int(e[SKIPPED]) for e in examples))
  return out


# ----------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------
def _shard(shard_options, global_batch_size) -> tuple[grain.sharding.ShardOptions, int]:
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  if global_batch_size % shard_options.shard_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of the {shard_options.shard_count} "
                     "processes")
  return shard_options, global_batch_size // shard_options.shard_count


def _mp_prefetch(it: grain.IterDataset, worker_count: int) -> grain.IterDataset:
  # grain's worker processes read absl flags; outside an absl app (pytest, notebooks, our CLIs)
  # they are unparsed and grain raises UnparsedFlagAccessError: take the defaults.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


def _tokenize(tokenizer, tokenize_fn, max_txt_len):
  if tokenizer is not None and tokenize_fn is not None:
    raise ValueError("pass tokenizer or tokenize_fn, not both")
  return make_tokenize_fn(tokenizer, max_txt_len) if tokenizer is not None else tokenize_fn


def make_train_loader(source, *, global_batch_size: int, image_size: int, seed: int, tokenizer=None,
                      tokenize_fn: Callable[[str], dict] | None = None, max_txt_len: int = 32,
                      num_epochs: int | None = None, shuffle: bool = True, worker_count: int = 0,
                      shard_options: grain.sharding.ShardOptions | None = None,
                      text_fn: Callable[[dict, Any], str] = caption_text, max_words: int = MAX_WORDS,
                      read_options: grain.ReadOptions | None = None, augment: bool = True) -> grain.IterDataset:
  """The BLIP-2 training pipeline over `source` (any `len` / `getitem` source of record dicts).

  Shards by JAX process (`shard_options` overrides: `grain.sharding.ShardOptions(i, n)`), each
  shard of equal size (the len(source) % n remainder is dropped); per-process batch
  global_batch_size // process count, remainder dropped. `num_epochs=None` repeats forever.
  `tokenizer` (HF; right padding to `max_txt_len`) or `tokenize_fn(text) -> dict of (max_txt_len,)
  arrays`; `text_fn(record, rng) -> str` picks the text (default: the caption, a random one from a
  list), which then goes through `pre_caption(max_words)`; a text_fn returning a dict of strings
  (e.g. {"instruction", "response"}) gives those fields untouched and untokenised. `worker_count > 0` decodes in that many
  grain worker processes (the iterator state stays exact). `augment=False` replaces BLIP-2's
  RandomResizedCrop + flip by the eval transform (resize + normalise), for data whose captions a
  crop or a flip would falsify ("at the top left", "three circles"). Returns a `grain.IterDataset`;
  `iter(...)` gives a `DatasetIterator` with `get_state` / `set_state` for checkpoints.
  """
  shard, per_process = _shard(shard_options, global_batch_size)
  n = len(source)
  if shard.drop_remainder:
    n -= n % shard.shard_count
  ds = shard_ds = grain.MapDataset.range(n)[shard.shard_index::shard.shard_count]
  if len(ds) == 0:
    raise ValueError(f"source has {len(source)} records: none left for shard {shard.shard_index} of "
                     f"{shard.shard_count}")
  if shuffle:
    ds = ds.shuffle(seed=int(seed) % 2**32)
  ds = ds.repeat(num_epochs)
  map_seed = int(np.random.SeedSequence([int(seed) % 2**32, shard.shard_index]).generate_state(1)[0])
  example = _Example(source, image_size, text_fn, _tokenize(tokenizer, tokenize_fn, max_txt_len), max_words,
                     train=augment, processor=None if augment else ImageProcessor(image_size))
  ds = ds.random_map(_TrainMap(example), seed=map_seed)
  if read_options is None:
    read_options = grain.ReadOptions(num_threads=8, prefetch_buffer_size=max(2 * per_process, 16))
  it = _SkipCounting(ds.to_iter_dataset(read_options), max_consecutive=max(len(shard_ds), 1))
  it = it.batch(per_process, drop_remainder=True, batch_fn=_stack)
  if worker_count > 0:
    it = _mp_prefetch(it, worker_count)
  return it


def eval_num_batches(num_records: int, global_batch_size: int, process_count: int) -> int:
  """Batches per process that `make_eval_loader` yields."""
  per_process = global_batch_size // process_count
  return math.ceil(math.ceil(num_records / process_count) / per_process)


class _EvalMap(grain.transforms.Map):

  def __init__(self, example: _Example, num_records, shard_index, shard_count):
    self.example, self.n, self.i, self.count = example, num_records, shard_index, shard_count

  def map(self, j):
    index = int(j) * self.count + self.i
    ex = self.example(index) if index < self.n else None
    if ex is not None and _MARKER not in ex:
      ex.update(mask=np.int32(1), **{SKIPPED: np.int32(0)})
      return ex
    blank = {"image": np.zeros((*self.example.processor.size, 3), np.float32), "index": np.int64(-1),
             "mask": np.int32(0), SKIPPED: np.int32(ex is not None)}
    if self.example.text_fn is not None and self.example.tokenize_fn is not None:
      blank.update({k: np.zeros_like(v) for k, v in self.example.tokenize_fn("").items()})
    elif self.example.text_fn is not None:
      blank["text"] = ""
    return blank


def make_eval_loader(source, *, global_batch_size: int, image_size: int, tokenizer=None,
                     tokenize_fn: Callable[[str], dict] | None = None, max_txt_len: int = 32,
                     shard_options: grain.sharding.ShardOptions | None = None, worker_count: int = 0,
                     text_fn: Callable[[dict, Any], str] | None = None, max_words: int = MAX_WORDS,
                     image_processor: ImageProcessor | None = None,
                     read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """One ordered pass for evaluation: process p gets records p, p + n, p + 2n, ... (n processes).

  Images: `image_processor` (default `ImageProcessor(image_size)`, the HF / LAVIS eval transform).
  Text (only when a tokenizer / tokenize_fn / text_fn is given): `text_fn(record, None)` (default
  the caption, the first of a list) -> pre_caption -> tokens. Rows: "mask" 1 for real records, 0
  for padding and skipped images (whose "num_skipped" is 1); "index" -1 on padding. Yields
  `eval_num_batches(len(source), global_batch_size, n)` batches on every process.
  """
  shard = shard_options if shard_options is not None else grain.sharding.ShardByJaxProcess()
  shard, per_process = _shard(shard, global_batch_size)
  tok = _tokenize(tokenizer, tokenize_fn, max_txt_len)
  if text_fn is None and tok is not None:
    text_fn = caption_text
  processor = image_processor or ImageProcessor(image_size)
  example = _Example(source, image_size, text_fn, tok, max_words, False, processor)
  nb = eval_num_batches(len(source), global_batch_size, shard.shard_count)
  ds = grain.MapDataset.range(nb * per_process).map(_EvalMap(example, len(source), shard.shard_index,
                                                              shard.shard_count))
  if read_options is None:
    read_options = grain.ReadOptions(num_threads=8, prefetch_buffer_size=max(2 * per_process, 16))
  it = ds.to_iter_dataset(read_options).batch(per_process, batch_fn=_stack)
  if worker_count > 0:
    it = _mp_prefetch(it, worker_count)
  return it
