"""BLEU-4 / CIDEr-D (blip2_jax.evaluation.caption) against hand arithmetic, pycocoevalcap and nltk.

Measured: against pycocoevalcap 1.2 `Bleu(4)` / `Cider()` on 3 x 60 generated images x 5
references (BLEU-4 ~0.67, CIDEr ~1.1), max abs diff 0.0 for BLEU-1..4 and CIDEr (corpus and
per image; the tests allow 1e-12); against nltk `corpus_bleu` about 1e-9 relative (the
1e-9 / 1e-15 smoothing pycocoevalcap adds). `tokenize` equals the java PTBTokenizer + punctuation
drop of the COCO evaluation on every sentence of PTB_CASES (checked when java is on PATH).
"""
import math
import random
import shutil

import numpy as np
import pytest

from blip2_jax.evaluation import caption, evaluate_captions

# --- hand-made example, BLEU arithmetic spelled out ---------------------------------------
HYPS = ["the cat sat on the mat", "a dog runs in the park"]
REFS = [["the cat is on the mat"], ["a dog runs in a park", "the dog is running in the park"]]


def test_bleu_by_hand():
  # image 1: hyp "the cat sat on the mat" vs "the cat is on the mat"
  #   1-grams: the x2 (ref has 2), cat, on, mat match; sat does not  -> 5 / 6
  #   2-grams: the cat, on the, the mat match; cat sat, sat on not   -> 3 / 5
  #   3-grams: on the mat                                              -> 1 / 4
  #   4-grams: none                                                    -> 0 / 3
  # image 2: hyp "a dog runs in the park" vs two refs (clip by the max count in any ref)
  #   1-grams: all 6 match                                             -> 6 / 6
  #   2-grams: a dog, dog runs, runs in (ref 1), in the, the park (ref 2) -> 5 / 5
  #   3-grams: a dog runs, dog runs in (ref 1), in the park (ref 2)   -> 3 / 4
  #   4-grams: a dog runs in                                           -> 1 / 3
  # corpus: p1 = 11/12, p2 = 8/10, p3 = 4/8, p4 = 1/6; hyp length 12, closest ref lengths 6 + 6 = 12
  # -> no brevity penalty; BLEU-4 = (p1 p2 p3 p4)^(1/4) = (11/180)^(1/4) = 0.49719...
  p = [11 / 12, 8 / 10, 4 / 8, 1 / 6]
  expected = [p[0], (p[0] * p[1]) ** 0.5, (p[0] * p[1] * p[2]) ** (1 / 3), (p[0] * p[1] * p[2] * p[3]) ** 0.25]
  got = caption.bleu(HYPS, REFS)
  np.testing.assert_allclose(got, expected, rtol=1e-8)  # smoothing terms are 1e-9 / 1e-15
  assert abs(got[3] - 0.4971988) < 1e-6


def test_bleu_brevity_penalty_by_hand():
  # hyp "the cat" (2 words) vs ref "the cat is on the mat" (6): p1 = 2/2, p2 = 1/1, p3 = p4 = 0/0 -> 0;
  # BLEU-2 = 1 * exp(1 - 6/2) = e^-2
  b = caption.bleu(["the cat"], [["the cat is on the mat"]])
  assert abs(b[1] - math.exp(-2)) < 1e-8 and abs(b[0] - math.exp(-2)) < 1e-8
  # no 3- / 4-grams: pycocoevalcap's smoothing makes p3 = p4 = 1e-15 / 1e-9 = 1e-6, so
  # BLEU-4 = (1 * 1 * 1e-6 * 1e-6)^(1/4) * e^-2 = 1e-3 * e^-2, not 0
  assert b[3] == pytest.approx(1e-3 * math.exp(-2), rel=1e-6)


def test_cider_by_hand():
  # two images, one reference each, hyp == ref. "a" is in the refs of both images: df 2, so its
  # idf log(2 / 2) = 0; "cat" / "dog" / "a cat" / "a dog" have df 1 -> weight log 2.
  # 1-grams: hyp and ref vectors equal -> cosine 1; 2-grams: equal -> 1; no 3- / 4-grams -> 0.
  # equal lengths -> Gaussian penalty 1. CIDEr = 10 * mean(1, 1, 0, 0) = 5 for each image.
  score, per = caption.cider(["a cat", "a dog"], [["a cat"], ["a dog"]])
  assert score == pytest.approx(5.0, abs=1e-12) and np.allclose(per, 5.0)
  # a hypothesis sharing nothing with its references scores 0
  score, per = caption.cider(["zebra stripes", "a dog"], [["a cat"], ["a dog"]])
  assert per[0] == 0.0 and per[1] == pytest.approx(5.0)
  # 4-word exact matches of disjoint sentences: every order has cosine 1 -> 10
  score, _ = caption.cider(["red car on road", "blue boat at sea"], [["red car on road"], ["blue boat at sea"]])
  assert score == pytest.approx(10.0, abs=1e-12)
  # length penalty: hyp "a cat" (1 bigram) vs ref "a cat sleeping here" (3 bigrams), other image "a dog":
  # delta = 1 - 3 = -2 (pycocoevalcap measures length in bigrams) -> factor exp(-4 / 72)
  s1, per = caption.cider(["a cat", "a dog"], [["a cat sleeping here"], ["a dog"]])
  # 1-grams: hyp {a: 0, cat: l}, ref {a: 0, cat: l, sleeping: l, here: l} (l = log 2):
  #   sum min(h, r) r / (|h| |r|) = l^2 / (l * l sqrt 3) = 1 / sqrt 3
  # 2-grams: hyp {a cat: l}, ref {a cat, cat sleeping, sleeping here: l} -> 1 / sqrt 3; 3-, 4-grams: 0
  expect = 10 * (2 / math.sqrt(3)) / 4 * math.exp(-4 / 72)
  assert per[0] == pytest.approx(expect, rel=1e-12)


def _corpus(seed=0, n_img=60, n_ref=5):
  rng = random.Random(seed)
  words = "a the man woman dog cat red blue sitting standing on in near table street field ball car of with".split()
  sent = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))  # noqa: E731
  refs = [[sent() for _ in range(n_ref)] for _ in range(n_img)]
  preds = [rng.choice(refs[i])[: rng.randint(5, 40)].rsplit(" ", 1)[0] + " " + rng.choice(words)
           for i in range(n_img)]
  return preds, refs


def test_against_pycocoevalcap():
  Bleu = pytest.importorskip("pycocoevalcap.bleu.bleu").Bleu
  Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
  for seed in range(3):
    preds, refs = _corpus(seed)
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [p] for i, p in enumerate(preds)}
    ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ref_cider, ref_per = Cider().compute_score(gts, res)
    ours = evaluate_captions(preds, refs, tokenized=True)
    for k in range(4):
      assert abs(ours[f"Bleu_{k + 1}"] - ref_bleu[k]) <= 1e-14, (seed, k)
    assert abs(ours["CIDEr"] - ref_cider) <= 1e-12, seed
    np.testing.assert_allclose(caption.cider(preds, refs)[1], ref_per, rtol=0, atol=1e-12)
  # the hand-made example too
  gts = {i: r for i, r in enumerate(REFS)}
  res = {i: [h] for i, h in enumerate(HYPS)}
  assert abs(Bleu(4).compute_score(gts, res, verbose=0)[0][3] - caption.bleu(HYPS, REFS)[3]) < 1e-15


def test_against_nltk():
  bleu_score = pytest.importorskip("nltk.translate.bleu_score")
  # nltk counts a hypothesis shorter than n as 0 / 1 n-gram precision (denominator max(1, .)),
  # pycocoevalcap as 0 / 0; they agree when every hypothesis has at least 4 words
  preds, refs = _corpus(7)
  keep = [i for i, p in enumerate(preds) if len(p.split()) >= 4]
  assert len(keep) > 40
  preds, refs = [preds[i] for i in keep], [refs[i] for i in keep]
  ref = bleu_score.corpus_bleu([[r.split() for r in rs] for rs in refs], [p.split() for p in preds])
  assert ref > 0.05
  assert abs(caption.bleu(preds, refs)[3] - ref) / ref < 1e-7
  ref_hand = bleu_score.corpus_bleu([[r.split() for r in rs] for rs in REFS], [h.split() for h in HYPS])
  assert abs(caption.bleu(HYPS, REFS)[3] - ref_hand) < 1e-8


PTB_CASES = [
    "A man riding a wave on top of a surfboard.",
    'Two dogs don\'t play with the cat\'s toy, it\'s "fun"!',
    "A black-and-white photo of a street sign (stop) at 3:30 p.m.",
    "The kids' bikes are parked; 1,000 people... watching 2.5 hours",
    "A woman's hand holding a cell-phone -- next to a U.S. flag?",
    "they're sitting at the table and we'll eat I'm happy you'd see",
    "a [red] {blue} sign reads \"hello world\" and 'open'",
    "a dog.  a cat , on the mat .",
    "A Man's Shirts' Colors - bright",
    "people's dogs can't won't aren't",
    "an old-fashioned 1960s car parked at the curb....",
]
PTB_EXPECTED = [
    "a man riding a wave on top of a surfboard",
    "two dogs do n't play with the cat 's toy it 's fun",
    "a black-and-white photo of a street sign -lrb- stop -rrb- at 3:30 p.m.",
    "the kids bikes are parked 1,000 people watching 2.5 hours",
    "a woman 's hand holding a cell-phone next to a u.s. flag",
    "they 're sitting at the table and we 'll eat i 'm happy you 'd see",
    "a -lsb- red -rsb- -lcb- blue -rcb- sign reads hello world and open",
    "a dog a cat on the mat",
    "a man 's shirts colors bright",
    "people 's dogs ca n't wo n't are n't",
    "an old-fashioned 1960s car parked at the curb",
]


def test_tokenize():
  # the expected strings are the java PTBTokenizer's (-lowerCase) output with pycocoevalcap's
  # punctuation list dropped (it lists "-LRB-" upper-case, so the lower-cased "-lrb-" stays)
  assert [caption.tokenize(s) for s in PTB_CASES] == PTB_EXPECTED


@pytest.mark.skipif(shutil.which("java") is None, reason="java not on PATH")
def test_tokenize_equals_ptb():
  ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
  caps = {i: [{"caption": s}] for i, s in enumerate(PTB_CASES)}
  got = ptb.PTBTokenizer().tokenize(caps)
  assert [got[i][0] for i in range(len(PTB_CASES))] == PTB_EXPECTED


def test_evaluate_captions_api():
  out = evaluate_captions(["The cat sat on the mat.", "A dog runs in the park!"],
                          [["The cat is on the mat."], ["A dog runs in a park.", "The dog is running in the park."]])
  assert set(out) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
  assert out["Bleu_4"] == pytest.approx(caption.bleu(HYPS, REFS)[3], abs=1e-15)  # tokenised = HYPS / REFS
  by_id = evaluate_captions({"b": HYPS[1], "a": HYPS[0]}, {"a": REFS[0], "b": REFS[1]}, tokenized=True)
  assert by_id == pytest.approx(out)
  with pytest.raises(ValueError, match="same keys"):
    evaluate_captions({"a": "x"}, {"b": ["x"]})
  with pytest.raises(ValueError, match="2 predictions but 1"):
    evaluate_captions(["x", "y"], [["x"]])
