"""A CapFilt-shaped job without models, for tests/data/test_capfilt_shards.py: reads the input shards
and writes them through CapfiltOutput, keeping for each image a "synthetic" caption made from its key
and its sampling seed (input_shards.sample_seed), and its first web text. As a script (`python
capfilt_writer.py OUT DELAY INPUT...`) it sleeps DELAY seconds per sample, so that a test can kill it
mid-shard."""
from __future__ import annotations

import sys
import time

from blip2_jax.data import capfilt_shards, input_shards
from blip2_jax.data.processing import ImageLoadError
from blip2_jax.data.transforms import decode_image

SETTINGS = {"inputs": [], "captioner": "none", "filter": "clip", "num_captions": 1, "top_k": 2, "seed": 0}
RECORDS_PER_SHARD = 3


def synthetic_caption(key: str) -> str:
  """What a captioner sampling with the image's own seed might write: the seed shows in the text."""
  return f"synthetic caption {input_shards.sample_seed(SETTINGS['seed'], key)} of {key}"


def run(inputs, out_dir, *, delay=0.0, process_index=0, process_count=1, settings=None) -> list[str]:
  """Writes this process's unfinished shards; returns the damage lines it printed."""
  shards = input_shards.list_input_shards(inputs, records_per_shard=RECORDS_PER_SHARD)
  out = capfilt_shards.CapfiltOutput(out_dir)
  out.start({**SETTINGS, "inputs": [str(i) for i in inputs], **(settings or {})}, shards,
            process_index=process_index)
  done, lines = set(out.completed_shards()), []
  for shard in input_shards.shards_for_process(shards, process_index, process_count):
    if shard.name in done:
      continue
    with out.write_shard(shard) as w:
      for s in w.samples():
        time.sleep(delay)
        try:
          decode_image(s.image, name=s.key)
        except ImageLoadError as e:
          w.skip(s, input_shards.image_skip_reason(e))
          continue
        captions = [synthetic_caption(s.key)] + s.web_texts[:1]
        w.write(s, captions, [0.75, 0.5][:len(captions)], ["synthetic", "web"][:len(captions)])
    if w.damage:
      lines.append(w.damage.describe(shard.name))
      print(lines[-1], file=sys.stderr, flush=True)
  return lines


if __name__ == "__main__":
  run(sys.argv[3:], sys.argv[1], delay=float(sys.argv[2]))
