"""blip2_jax.decoding.search against transformers 5.23 `generate`, token for token.

The reference is a tiny HF `PreTrainedModel` + `GenerationMixin` whose logits are a lookup in a
random trigram table (logits = table[prev token, last token]); our step_fn looks the same float32
table up in JAX, so both sides see bit-identical logits and only the search algorithms and the
processors are compared. Contexts are left-padded (rows of different lengths) with a pad id that is
an ordinary, generatable token, and the EOS column is biased so sequences end mid-way.
"""
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.generation import logits_process as lp
from transformers.modeling_outputs import CausalLMOutputWithPast

from blip2_jax.decoding import search

from bounds import bound
from helpers import count_traces

V, PAD, EOS, G = 24, 3, 5, 10


class ToyConfig(PretrainedConfig):
  model_type = "toy_trigram"

  def __init__(self, vocab_size=V, **kw):
    super().__init__(**kw)
    self.vocab_size = vocab_size


class ToyLM(PreTrainedModel, GenerationMixin):
  """Logits for the next token = table[input_ids[:, -2], input_ids[:, -1]] (no cache)."""
  config_class = ToyConfig

  def __init__(self, config, table):
    super().__init__(config)
    self.table = torch.from_numpy(table)
    self.w = torch.nn.Parameter(torch.zeros(1))

  def forward(self, input_ids=None, attention_mask=None, **kw):
    return CausalLMOutputWithPast(logits=self.table[input_ids[:, -2], input_ids[:, -1]][:, None])


@functools.lru_cache(maxsize=None)
def make_table(seed=0, eos_bias=0.5, copy_bias=2.0):
  """table[a, b] = logits after the tokens a, b; `copy_bias` favours a again (a b a b ... loops),
  so repetition penalty and n-gram bans have something to act on."""
  r = np.random.RandomState(seed)
  t = (r.randn(V, V, V) * 2).astype(np.float32)
  t[np.arange(V), :, np.arange(V)] += copy_bias
  t[..., EOS] += eos_bias
  return t


@functools.lru_cache(maxsize=None)
def make_step(seed=0, eos_bias=0.5):
  table = jnp.asarray(make_table(seed, eos_bias))

  def step_fn(last, tokens, step):
    return table[last, tokens], tokens
  return step_fn


def contexts(seed=1, lengths=(4, 2, 5, 3, 5, 3)):
  r = np.random.RandomState(seed)
  c = max(lengths)
  ids = np.full((len(lengths), c), PAD, np.int64)
  mask = np.zeros((len(lengths), c), np.int64)
  for i, n in enumerate(lengths):
    ids[i, c - n:] = r.randint(0, V, n)
    mask[i, c - n:] = 1
  return ids, mask


def hf_generate(ids, mask, seed=0, eos_bias=0.5, max_new_tokens=G, **kw):
  """HF tokens -> (B, max_new_tokens): new tokens, padded, pad after the first EOS (our contract;
  HF's beam search fills with `pad or eos[0]` and crops to the longest row)."""
  model = ToyLM(ToyConfig(), make_table(seed, eos_bias)).eval()
  kw.setdefault("eos_token_id", EOS)
  kw.setdefault("pad_token_id", PAD)
  with torch.no_grad():
    out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         max_new_tokens=max_new_tokens, use_cache=False, **kw).numpy()
  eos = kw["eos_token_id"]
  eos = [eos] if isinstance(eos, int) else list(eos or [])
  pad = kw["pad_token_id"] if kw["pad_token_id"] is not None else eos[0]
  new = np.full((ids.shape[0], max_new_tokens), pad, np.int64)
  new[:, :out.shape[1] - ids.shape[1]] = out[:, ids.shape[1]:]
  for row in new:
    hit = np.flatnonzero(np.isin(row, eos))
    if hit.size:
      row[hit[0] + 1:] = pad
  return new


def jax_generate(ids, mask, seed=0, eos_bias=0.5, max_new_tokens=G, **kw):
  table = make_table(seed, eos_bias)
  kw.setdefault("eos_token_id", EOS)
  kw.setdefault("pad_token_id", PAD)
  first = jnp.asarray(table[ids[:, -2], ids[:, -1]])
  out = search.search(make_step(seed, eos_bias), jnp.asarray(ids[:, -1], jnp.int32), first,
                          jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=max_new_tokens, **kw)
  assert out.dtype == jnp.int32 and out.shape == (ids.shape[0], max_new_tokens)
  return np.asarray(out)


LONG = {"max_new_tokens": 24, "eos_bias": -2.0}  # no EOS: long loops for the n-gram bans
GREEDY = [
    {},
    {"min_new_tokens": 4},
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.8},
    {"no_repeat_ngram_size": 2, **LONG},
    {"no_repeat_ngram_size": 3, "repetition_penalty": 1.3, **LONG},
    {"pad_token_id": None},
    {"eos_token_id": [EOS, 7]},
]
BEAM = ([{"num_beams": k, "length_penalty": l, "early_stopping": e}
         for k, l, e in [(3, -1.0, False), (3, 0.0, True), (3, 1.0, False), (3, 1.0, True),
                         (5, -1.0, True), (5, 0.0, False), (5, 1.0, True), (5, -1.0, False)]]
        + [{"num_beams": 3, "length_penalty": l, "early_stopping": "never"} for l in (-1.0, 1.0)]
        + [{"num_beams": 3, "repetition_penalty": 1.3},
           {"num_beams": 4, "no_repeat_ngram_size": 2, "min_new_tokens": 3},
           {"num_beams": 3, "no_repeat_ngram_size": 3, **LONG},
           {"num_beams": 3, "eos_token_id": [EOS, 7], "length_penalty": 0.5}]
        # long runs where the early-stop heuristic decides the result (these two fail if the
        # heuristic's block on new finished beams or its "never" length is wrong)
        + [{"num_beams": 2, "length_penalty": 1.0, "early_stopping": e, "max_new_tokens": 16}
           for e in (False, "never")])


@pytest.mark.parametrize("kw", GREEDY + BEAM, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_matches_hf_generate(kw):
  ids, mask = contexts()  # 6 rows, left padding, contexts of 2..5 tokens
  np.testing.assert_array_equal(jax_generate(ids, mask, **kw), hf_generate(ids, mask, **kw))


def test_cases_exercise_the_features():
  """The equality test would be weak if the options changed nothing: check they do, and that
  EOS lands in the middle of rows (so pad-after-EOS and the finished-row logic run)."""
  ids, mask = contexts()
  for extra in ({}, {"num_beams": 3}):
    ends = [np.flatnonzero(r == EOS) for r in hf_generate(ids, mask, **extra)]
    assert sum(1 for e in ends if e.size and 0 < e[0] < G - 1) >= 2, extra
  for kw in GREEDY[1:6] + BEAM[10:14]:
    kw = dict(kw)
    base = {k: kw.pop(k) for k in ("max_new_tokens", "eos_bias", "num_beams") if k in kw}
    assert (hf_generate(ids, mask, **base, **kw) != hf_generate(ids, mask, **base)).any(), kw
  outs = [hf_generate(ids, mask, num_beams=5, length_penalty=l) for l in (-1.0, 1.0)]
  assert (outs[0] != outs[1]).any()
  outs = [hf_generate(ids, mask, num_beams=3, early_stopping=e) for e in (False, True)]
  assert (outs[0] != outs[1]).any()
  outs = [hf_generate(ids, mask, **kw) for kw in BEAM[-2:]]  # False vs "never" differ
  assert (outs[0] != outs[1]).any()


def test_min_new_tokens_pushes_eos_back():
  ids, mask = contexts(1)
  out = jax_generate(ids, mask, eos_bias=4.0, min_new_tokens=4)
  early = jax_generate(ids, mask, eos_bias=4.0)
  np.testing.assert_array_equal(out, hf_generate(ids, mask, eos_bias=4.0, min_new_tokens=4))
  assert (early[:, 0] == EOS).any() and not (out[:, :4] == EOS).any()


# ----------------------------------------------------------------------------------------
# processors against HF's classes


def test_repetition_penalty_matches_hf_with_left_padding():
  """HF 5.23 skips the leading pads (prompt_ignore_length = argmax(mask != 0)) but counts masked
  positions after the first real token."""
  r = np.random.RandomState(0)
  n, length, vocab = 6, 12, 10
  ids = r.randint(0, vocab, (n, length))
  mask = np.ones((n, length), np.int64)
  for i in range(n):
    mask[i, :i] = 0
  mask[5, 8] = 0  # a hole after the first real token still counts in HF
  scores = r.randn(n, vocab).astype(np.float32) * 3
  for penalty in (1.3, 0.7):
    proc = lp.RepetitionPenaltyLogitsProcessor(
        penalty, prompt_ignore_length=torch.from_numpy(mask).argmax(dim=1))
    want = proc(torch.from_numpy(ids), torch.from_numpy(scores)).numpy()
    seen = search._penalty_mask(jnp.asarray(mask), 0)
    got = search.apply_processors(jnp.asarray(scores), jnp.asarray(ids), seen, length,
                                      prompt_len=length, repetition_penalty=penalty)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_hf(n):
  r = np.random.RandomState(n)
  rows, vocab = 5, 4
  scores = r.randn(rows, vocab + 2).astype(np.float32)
  ban = jax.jit(lambda sc, buf, cur_len: search.apply_processors(
      sc, buf, jnp.ones(buf.shape, bool), cur_len, prompt_len=1, no_repeat_ngram_size=n))
  for cur_len in range(1, 14):
    buf = r.randint(0, vocab, (rows, 18))  # positions >= cur_len are junk the ban must ignore
    ids = buf[:, :cur_len]
    want = lp.NoRepeatNGramLogitsProcessor(n)(torch.from_numpy(ids), torch.from_numpy(scores)).numpy()
    got = ban(jnp.asarray(scores), jnp.asarray(buf), jnp.int32(cur_len))
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"cur_len {cur_len}")


def test_min_new_tokens_matches_hf():
  scores = np.random.RandomState(0).randn(2, 9).astype(np.float32)
  proc = jax.jit(lambda sc, cur_len: search.apply_processors(
      sc, jnp.zeros((2, 12), jnp.int32), jnp.ones((2, 12), bool), cur_len, prompt_len=4,
      min_new_tokens=3, eos_token_id=[2, 6]))
  for cur_len in range(4, 10):
    ids = torch.zeros((2, cur_len), dtype=torch.long)
    want = lp.MinNewTokensLengthLogitsProcessor(4, 3, [2, 6])(ids, torch.from_numpy(scores)).numpy()
    np.testing.assert_array_equal(np.asarray(proc(jnp.asarray(scores), jnp.int32(cur_len))), want)


WARP = [(1.0, 5, 1.0, 1), (0.7, 0, 0.9, 1), (1.5, 10, 0.8, 1), (1.0, 0, 0.5, 2), (0.5, 3, 0.3, 2),
        (1.0, 1, 1.0, 1), (2.0, 40, 0.95, 3), (0.9, 0, 0.05, 1)]


@pytest.mark.parametrize("temperature,top_k,top_p,keep", WARP)
def test_warpers_match_hf(temperature, top_k, top_p, keep):
  r = np.random.RandomState(top_k + keep)
  scores = (r.randn(16, 50) * 3).astype(np.float32)
  chain = []
  if temperature != 1.0:
    chain.append(lp.TemperatureLogitsWarper(temperature))
  if top_k:
    chain.append(lp.TopKLogitsWarper(top_k, min_tokens_to_keep=keep))
  if top_p < 1.0:
    chain.append(lp.TopPLogitsWarper(top_p, min_tokens_to_keep=keep))
  want = torch.from_numpy(scores)
  for proc in chain:
    want = proc(None, want)
  want = want.numpy()
  got = np.asarray(search.process_logits(jnp.asarray(scores), temperature=temperature,
                                             top_k=top_k, top_p=top_p, min_tokens_to_keep=keep))
  np.testing.assert_array_equal(got, want)  # same kept set, same (temperature-divided) values
  logp = np.asarray(search.process_logits(jnp.asarray(scores), temperature=temperature,
                                              top_k=top_k, top_p=top_p, min_tokens_to_keep=keep,
                                              log_probs=True))
  ref = torch.log_softmax(torch.from_numpy(want), -1).numpy()
  # filtered tokens are -inf on both sides; measured 9.5e-7 (ulp of log_softmax)
  np.testing.assert_allclose(logp, ref, atol=bound(ref[np.isfinite(ref)]), rtol=0)


# ----------------------------------------------------------------------------------------
# sampling


def _sample(rng, ids, mask, **kw):
  return jax_generate(ids, mask, do_sample=True, rng=rng, **kw)


def test_sampling_is_reproducible():
  ids, mask = contexts(1)
  kw = dict(temperature=0.8, top_k=6, top_p=0.9)
  a = _sample(jax.random.key(0), ids, mask, **kw)
  np.testing.assert_array_equal(a, _sample(jax.random.key(0), ids, mask, **kw))
  assert (a != _sample(jax.random.key(1), ids, mask, **kw)).any()
  b = _sample(jax.random.key(0), ids, mask, num_beams=3, **kw)
  np.testing.assert_array_equal(b, _sample(jax.random.key(0), ids, mask, num_beams=3, **kw))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_samples_stay_in_the_filtered_set(num_beams):
  """Every token of every output path must have a finite processed score given its own two
  previous tokens (no EOS, so no padding and min_tokens_to_keep = n_eos + 1 = 1 for beams too;
  beams sample from processed log-softmax scores)."""
  ids = np.tile(np.array([[2, 9]]), (32, 1))
  mask = np.ones_like(ids)
  kw = dict(temperature=1.3, top_k=4, top_p=0.8, eos_token_id=None, pad_token_id=None)
  out = _sample(jax.random.key(3), ids, mask, num_beams=num_beams, **kw)
  table = make_table()
  path = np.concatenate([ids, out], axis=1)
  for t in range(G):
    logits = jnp.asarray(table[path[:, t], path[:, t + 1]])
    if num_beams > 1:
      logits = jax.nn.log_softmax(logits, -1)
    proc = np.asarray(search.process_logits(logits, temperature=1.3, top_k=4, top_p=0.8,
                                                min_tokens_to_keep=1))
    chosen = proc[np.arange(32), path[:, t + 2]]
    assert np.isfinite(chosen).all(), t
  assert len(np.unique(out[:, 0])) > 1  # it does sample


def test_sampling_frequencies_follow_processed_probabilities():
  n = 4000
  ids = np.tile(np.array([[4, 11]]), (n, 1))
  out = _sample(jax.random.key(7), ids, np.ones_like(ids), max_new_tokens=1, temperature=1.5,
                top_k=8, eos_token_id=None, pad_token_id=None)
  probs = np.asarray(search.process_logits(jnp.asarray(make_table()[4, 11][None]),
                                               temperature=1.5, top_k=8, log_probs=True))[0]
  freq = np.bincount(out[:, 0], minlength=V) / n
  np.testing.assert_allclose(freq, np.exp(probs), atol=0.03)  # ~4 sigma at n=4000
  assert (freq[np.exp(probs) == 0] == 0).all()


# ----------------------------------------------------------------------------------------
# compilation


def test_compiles_once_per_shape():
  ids, mask = contexts(1)
  ids2, _ = contexts(5)
  with count_traces("_search_impl") as traces:
    a = jax_generate(ids, mask, num_beams=2)  # options no other test uses: a fresh compile
    jax_generate(ids2, mask, num_beams=2)
    jax_generate(ids, mask, num_beams=2)
  assert len(traces) == 1
  with count_traces("_search_impl") as traces:
    jax_generate(ids, mask, num_beams=2, max_new_tokens=G + 2)
  assert len(traces) == 1
  # inside an outer jit the search is inlined into that program and gives the same tokens
  step = make_step()
  table = jnp.asarray(make_table())

  @jax.jit
  def outer(ids, mask):
    return search.search(step, ids[:, -1], table[ids[:, -2], ids[:, -1]], ids, mask,
                             max_new_tokens=G, num_beams=2, eos_token_id=EOS, pad_token_id=PAD)
  np.testing.assert_array_equal(np.asarray(outer(jnp.asarray(ids, jnp.int32), jnp.asarray(mask))), a)


def _count_eqns(jaxpr):
  n = 0
  for eqn in jaxpr.eqns:
    n += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _count_eqns(sub)
  return n


@pytest.mark.parametrize("num_beams", [1, 4])
def test_trace_does_not_grow_with_max_new_tokens(num_beams):
  ids, mask = contexts(1)
  step = make_step()
  table = jnp.asarray(make_table())

  def run(g):
    f = lambda ids, mask: search.search(
        step, ids[:, -1], table[ids[:, -2], ids[:, -1]], ids, mask, max_new_tokens=g,
        num_beams=num_beams, eos_token_id=EOS, repetition_penalty=1.2, no_repeat_ngram_size=2)
    return jax.make_jaxpr(f)(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)).jaxpr
  small, big = run(4), run(64)
  assert _count_eqns(small) == _count_eqns(big)
  assert any(e.primitive.name == "while" for e in small.eqns)
