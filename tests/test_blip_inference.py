"""The CapFilt-facing BLIP API (inference/blip.py) against transformers: ITM probabilities and ITC
cosines of many texts per image, per-image keys, and LAVIS-style retrieval
(`inference.retrieval_scores`) with a BLIP filter. `blip_captions` is tested with the decoding
(tests/decoding/test_blip_decoding.py), whose sampled captions it shares."""
import jax
import numpy as np
import pytest
import torch
import transformers as T

import blip2_jax
from blip2_jax import inference

from bounds import assert_close

TEXTS = [["a picture of two", "man sitting next to a red car", "dog"], [], ["cat", "two"]]


@pytest.fixture(scope="module")
def filt(tiny_checkpoint):
  d = tiny_checkpoint("BlipForImageTextRetrieval", None)
  hf = T.BlipForImageTextRetrieval.from_pretrained(d, attn_implementation="eager").eval()
  return (hf, T.AutoTokenizer.from_pretrained(d)) + blip2_jax.from_pretrained(d)


def _px(n, seed=1):
  return np.random.default_rng(seed).standard_normal((n, 28, 28, 3)).astype(np.float32)


def _nchw(px):
  return torch.from_numpy(np.asarray(px)).permute(0, 3, 1, 2)


def test_image_keys_follow_names_and_seed():
  a = jax.random.key_data(inference.image_keys(["x", "y", "x"]))
  assert (a[0] == a[2]).all() and (a[0] != a[1]).any()
  assert (jax.random.key_data(inference.image_keys(["x"], seed=1))[0] != a[0]).any()


def _hf_pairs(filt, px, texts, itm, enc_token_id=None):
  """HF's scores for every (image i, text) pair, tokenised as LAVIS's BlipITM (max 35)."""
  hf, tok = filt[:2]
  out = []
  for i, row in enumerate(texts):
    if not row:
      out.append(np.zeros(0, np.float32))
      continue
    enc = tok(row, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    ids = enc["input_ids"].clone()
    if enc_token_id is not None:
      ids[:, 0] = enc_token_id
    with torch.no_grad():
      r = hf(pixel_values=_nchw(px[i:i + 1]).expand(len(row), -1, -1, -1) if itm else _nchw(px[i:i + 1]),
             input_ids=ids, attention_mask=enc["attention_mask"], use_itm_head=itm).itm_score
    out.append((torch.softmax(r, -1)[:, 1] if itm else r[0]).numpy())
  return out


@pytest.mark.parametrize("mode", ["itm", "itc"])
def test_blip_itm_scores_match_hf(filt, mode):
  hf, tok, model, params = filt
  px = _px(3)
  got = inference.blip_itm_scores(model, params, tok, px, TEXTS, mode=mode)
  ref = _hf_pairs(filt, px, TEXTS, mode == "itm")
  assert [len(g) for g in got] == [3, 0, 2]
  for g, r in zip(got, ref):
    assert_close(g, r, f"{mode} scores")  # measured: ITM probabilities 1.0e-6, ITC cosines 1.5e-7
  embeds = inference.blip_image_embeds(model, params, px)
  again = inference.blip_itm_scores(model, params, tok, embeds, TEXTS, mode=mode)  # the ViT ran once above
  for a, g in zip(again, got):
    np.testing.assert_array_equal(a, g)


def test_blip_itm_scores_with_lavis_enc_token(filt):
  hf, tok, model, params = filt
  px = _px(3)
  got = inference.blip_itm_scores(model, params, tok, px, TEXTS, enc_token_id=99)
  for g, r in zip(got, _hf_pairs(filt, px, TEXTS, True, enc_token_id=99)):
    assert_close(g, r, "ITM probabilities with [ENC] first")  # measured 4.5e-7
  plain = inference.blip_itm_scores(model, params, tok, px, TEXTS)
  assert not np.allclose(got[0], plain[0])
  with pytest.raises(ValueError, match="2 text lists for 3 images"):
    inference.blip_itm_scores(model, params, tok, px, TEXTS[:2])


def test_retrieval_scores_rank_with_a_blip_filter(filt):
  """LAVIS's retrieval (ITC for all pairs, each top k re-scored as ITM logit[1] + ITC) runs on BLIP."""
  hf, tok, model, params = filt
  px = _px(3, seed=3)
  enc = tok(["a picture of two", "man", "red car", "cat"], padding="max_length", max_length=8, return_tensors="np")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  got = inference.retrieval_scores(model, params, px, ids, mask, k=2, batch_size=4)
  with torch.no_grad():
    itc = hf(pixel_values=_nchw(px), input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
             use_itm_head=False).itm_score.numpy()
    itm = np.stack([hf(pixel_values=_nchw(px[i:i + 1]).expand(4, -1, -1, -1), input_ids=torch.from_numpy(ids),
                       attention_mask=torch.from_numpy(mask)).itm_score[:, 1].numpy() for i in range(3)])
  assert_close(got["itc"], itc, "ITC")  # measured 3.0e-7
  top = np.argsort(-itc, axis=1, kind="stable")[:, :2]
  rows = np.arange(3)[:, None]
  assert_close(got["i2t"][rows, top], (itm + itc)[rows, top], "i2t: ITM logit + ITC")  # measured 2.9e-6 (to 1.7)
  assert (np.delete(got["i2t"], top + 4 * rows) == -100).all()
