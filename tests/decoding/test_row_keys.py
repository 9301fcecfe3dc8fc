"""Per-row sampling keys in decoding/search.py: row n samples step t from fold_in(rng[n], t), so a
row's tokens depend on its own key and inputs only (not its position, the batch size or the
devices), for `search` itself and for the stage-1 Q-Former captioner. One key keeps today's
behaviour (test_search.py)."""
import jax
import numpy as np
import pytest

import blip2_jax
from blip2_jax.decoding import qformer as QD
from blip2_jax.models import qformer

from test_search import EOS, contexts, jax_generate


@pytest.mark.parametrize("num_beams", [1, 2])
def test_search_per_row_keys(num_beams):
  """Row n of `search` samples from its own key: the same tokens at any position, in any batch size,
  and (typed or raw keys) the same stream."""
  ids, mask = contexts(1)
  kw = dict(do_sample=True, temperature=1.3, top_k=6, num_beams=num_beams)
  keys = jax.random.split(jax.random.key(3), len(ids))
  full = jax_generate(ids, mask, rng=keys, **kw)
  sub = np.array([4, 1])  # raw uint32 keys (N, 2) hold the same streams as typed ones
  raw = jax.random.key_data(keys)
  np.testing.assert_array_equal(jax_generate(ids[sub], mask[sub], rng=raw[sub], **kw), full[sub])
  perm = np.array([5, 2, 0, 1, 3, 4])
  np.testing.assert_array_equal(jax_generate(ids[perm], mask[perm], rng=keys[perm], **kw), full[perm])
  assert len({tuple(r) for r in full}) > 1 and EOS in full
  with pytest.raises(ValueError, match="2 per-row keys for a batch of 6"):
    jax_generate(ids, mask, rng=keys[:2], **kw)


def test_qformer_captioner_takes_per_row_keys(tiny_checkpoint):
  """The stage-1 Q-Former captioner samples row n from key n alone, too."""
  model, params = blip2_jax.from_pretrained(tiny_checkpoint("Blip2ForImageTextRetrieval", None))
  q = model.config.qformer
  head = jax.jit(lambda: qformer.QFormerLMHead(q).init(jax.random.PRNGKey(0), *qformer.init_args(q)[0]))()["params"]
  px = np.random.default_rng(2).standard_normal((3, 28, 28, 3)).astype(np.float32)
  keys = jax.random.split(jax.random.key(5), 3)
  kw = dict(bos_token_id=98, eos_token_id=3, pad_token_id=0, num_beams=1, do_sample=True, top_p=0.9,
            max_new_tokens=6, min_new_tokens=0)
  out = np.asarray(QD.generate(model, params, head, px, rng=keys, **kw))
  perm = np.array([2, 0, 1])
  again = QD.generate(model, params, head, px[perm], rng=keys[perm], **kw)
  np.testing.assert_array_equal(np.asarray(again), out[perm])
  assert len({tuple(r) for r in out}) > 1
