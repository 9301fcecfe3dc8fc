"""Caption metrics: BLEU-1..4 and CIDEr-D, as the COCO caption evaluation (pycocoevalcap) computes them.

`bleu` is pycocoevalcap's `Bleu(4)`: corpus-level modified n-gram precisions with the "closest"
reference length (ties: the shorter), the same 1e-15 / 1e-9 smoothing, brevity penalty
exp(1 - r/c) when c < r. `cider` is pycocoevalcap's `Cider()` (which is CIDEr-D): n = 1..4 tf-idf
vectors with document frequencies over the references of the evaluated set, clipped hypothesis
weights min(h, r) * r, Gaussian length penalty sigma = 6 on the bigram-count difference (as
pycocoevalcap counts length), mean over references and n, times 10.

Tokenisation: the COCO evaluation runs the Stanford PTBTokenizer (java) with lower-casing and then
drops punctuation tokens. `tokenize` is a pure-python stand-in documented as such: lower-case;
split off punctuation at word edges; split the PTB clitics ('s, n't, 're, 've, 'll, 'd, 'm); drop
the punctuation tokens pycocoevalcap drops (. , ? ! : ; - -- ... quotes, brackets). Words with
inner hyphens or apostrophes and decimal numbers stay whole, as in PTB. On ordinary captions it
gives the PTB tokens; exotic input (URLs, emoticons, unicode quotes) may differ.
Metrics are returned on pycocoevalcap's scale (BLEU in [0, 1]; CIDEr ~1.4 where papers print 140).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Mapping, Sequence

import numpy as np

# pycocoevalcap/tokenizer/ptbtokenizer.py PUNCTUATIONS, plus the bracket / quote characters
# themselves (PTB maps them to -LRB- etc., which that list drops).
_DROP = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
# PTB writes brackets as -LRB- etc.; with -lowerCase they become "-lrb-", which pycocoevalcap's
# upper-case list does NOT drop, so they stay in the COCO token stream (rare in captions).
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_ABBREV = re.compile(r"^([a-z]\.)+$")  # u.s. / p.m. keep their final period, as in PTB
_LEAD = "\"'`([{"
_TRAIL = "\"'`)]}.,!?;:"
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def _split_word(w: str) -> list[str]:
  lead, trail = [], []
  while w and w[0] in _LEAD:
    lead.append(w[0]); w = w[1:]  # noqa: E702
  while w and (w[-1] in _TRAIL or w.endswith("...")):
    if w.endswith("..."):
      trail.insert(0, "..."); w = w[:-3]  # noqa: E702
    else:
      trail.insert(0, w[-1]); w = w[:-1]  # noqa: E702
  mid: list[str] = []
  if trail and trail[0] == "." and _ABBREV.match(w + "."):
    w, trail = w + ".", trail[1:]
  if w:
    m = _CLITIC.match(w)
    mid = [m.group(1), m.group(2)] if m and m.group(1) not in ("", "n") else [w]
  return lead + mid + trail


def tokenize(sentence: str) -> str:
  """Lower-cased, punctuation-free, space-joined tokens (a PTBTokenizer stand-in; see module doc)."""
  s = sentence.replace("\n", " ").lower()
  s = re.sub(r"--+", " -- ", s)
  s = re.sub(r"([,;!?:](?!\d))", r" \1 ", s)  # split , ; ! ? : except inside numbers (1,000 / 3:30)
  out = []
  for w in s.split():
    out.extend(_BRACKETS.get(t, t) for t in _split_word(w) if t not in _DROP)
  return " ".join(out)


def _ngrams(words: Sequence[str], n: int) -> Counter:
  c: Counter = Counter()
  for k in range(1, n + 1):
    for i in range(len(words) - k + 1):
      c[tuple(words[i:i + k])] += 1
  return c


def bleu(preds: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4) -> list[float]:
  """Corpus BLEU-1..n on already tokenised, space-separated strings (pycocoevalcap `Bleu(n)`)."""
  tiny, small = 1e-15, 1e-9
  correct, guess = np.zeros(n), np.zeros(n)
  testlen = reflen = 0
  for hyp, rs in zip(preds, refs, strict=True):
    if not rs:
      raise ValueError("every prediction needs at least one reference")
    hw = hyp.split()
    maxref: dict = {}
    lens = []
    for r in rs:
      rw = r.split()
      lens.append(len(rw))
      for g, c in _ngrams(rw, n).items():
        maxref[g] = max(maxref.get(g, 0), c)
    reflen += min((abs(l - len(hw)), l) for l in lens)[1]
    testlen += len(hw)
    for g, c in _ngrams(hw, n).items():
      correct[len(g) - 1] += min(maxref.get(g, 0), c)
    guess += [max(0, len(hw) - k + 1) for k in range(1, n + 1)]
  out, prod = [], 1.0
  for k in range(n):
    prod *= (correct[k] + tiny) / (guess[k] + small)
    out.append(prod ** (1.0 / (k + 1)))
  ratio = (testlen + tiny) / (reflen + small)
  if ratio < 1:
    out = [b * math.exp(1 - 1 / ratio) for b in out]
  return [float(b) for b in out]


def cider(preds: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
          ) -> tuple[float, np.ndarray]:
  """CIDEr-D on tokenised strings (pycocoevalcap `Cider()`): (corpus mean, per-item scores)."""
  hyps = [_ngrams(h.split(), n) for h in preds]
  rcs = [[_ngrams(r.split(), n) for r in rs] for rs in refs]
  if len(hyps) != len(rcs):
    raise ValueError(f"{len(hyps)} predictions but {len(rcs)} reference lists")
  if any(not rs for rs in rcs):
    raise ValueError("every prediction needs at least one reference")
  df: Counter = Counter()
  for rs in rcs:
    df.update({g for r in rs for g in r})
  log_n = np.log(float(len(rcs)))

  def vec(cnt):
    v = [dict() for _ in range(n)]
    norm = np.zeros(n)
    for g, tf in cnt.items():
      w = float(tf) * (log_n - np.log(max(1.0, df.get(g, 0.0))))
      v[len(g) - 1][g] = w
      norm[len(g) - 1] += w * w
    length = sum(tf for g, tf in cnt.items() if len(g) == 2)  # pycocoevalcap counts bigrams as length
    return v, np.sqrt(norm), length

  scores = []
  for h, rs in zip(hyps, rcs):
    vh, nh, lh = vec(h)
    total = np.zeros(n)
    for r in rs:
      vr, nr, lr = vec(r)
      val = np.zeros(n)
      for k in range(n):
        for g, w in vh[k].items():
          wr = vr[k].get(g, 0.0)
          val[k] += min(w, wr) * wr
        if nh[k] != 0 and nr[k] != 0:
          val[k] /= nh[k] * nr[k]
        val[k] *= np.e ** (-(float(lh - lr) ** 2) / (2 * sigma ** 2))
      total += val
    scores.append(np.mean(total) / len(rs) * 10.0)
  scores = np.asarray(scores, np.float64)
  return float(np.mean(scores)), scores


def _as_lists(preds, refs):
  if isinstance(preds, Mapping):
    if not isinstance(refs, Mapping) or set(preds) != set(refs):
      raise ValueError("preds and refs must be dicts with the same keys (image ids)")
    keys = list(preds)
    preds, refs = [preds[k] for k in keys], [refs[k] for k in keys]
  preds, refs = list(preds), [list(r) if not isinstance(r, str) else [r] for r in refs]
  if len(preds) != len(refs):
    raise ValueError(f"{len(preds)} predictions but {len(refs)} reference lists")
  if not preds:
    raise ValueError("no predictions")
  return preds, refs


def evaluate_captions(preds, refs, *, tokenized: bool = False) -> dict[str, float]:
  """BLEU-1..4 and CIDEr(-D) of predicted captions against reference captions.

  preds: list of strings (one per image) or {image_id: str}; refs: list of lists of strings
  (COCO: 5 per image) or {image_id: [str, ...]}. Strings are tokenised with `tokenize` unless
  `tokenized=True`. Returns {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"} on the
  pycocoevalcap scale (fractions; CIDEr x100 is the number papers print).
  """
  preds, refs = _as_lists(preds, refs)
  if not tokenized:
    preds = [tokenize(p) for p in preds]
    refs = [[tokenize(r) for r in rs] for rs in refs]
  b = bleu(preds, refs, 4)
  out = {f"Bleu_{k + 1}": b[k] for k in range(4)}
  out["CIDEr"] = cider(preds, refs)[0]
  return out
