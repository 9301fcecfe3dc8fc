"""HF `generate` decoding (greedy, multinomial sampling, beam search, beam sampling) in JAX.

One compiled program per shape and option set: the decode loop is a `lax.while_loop` that stops
as soon as HF's loop would, and step t's choice is written into static buffers, so neither the
trace nor the compile grows with `max_new_tokens`. The model enters only through

  step_fn(state, tokens (N,), step) -> (logits (N, V), state)

(`blip2_jax.decoding.steps` builds it for OPT / LLaMA / T5), so every LLM family shares this code.

Matches transformers 5.23 `GenerationMixin._sample` / `_beam_search` (the v5 vectorised beam
search) and the processors `_get_logits_processor` builds for these options, in its order:
  RepetitionPenalty -> NoRepeatNGram -> MinLength / MinNewTokens -> [sampling only]
  Temperature -> TopK -> TopP.
What HF's processors see (its `input_ids`) is [context; generated]; two HF details kept on purpose:
  * repetition penalty skips the LEADING context positions before the first `context_mask` 1
    (HF 5.23 passes `prompt_ignore_length = argmax(attention_mask != 0)`); masked positions after
    the first real one still count, as in HF (for T5 HF passes no mask: the whole context counts).
  * the no-repeat-n-gram ban looks at every context position, left padding included (HF's
    processor has no mask).
Random streams (sampling and beam sampling): `rng` is one key, or one key per input row (typed keys
(B,) or raw uint32 keys (B, 2)). With one key, step t draws for the whole batch from
fold_in(rng, t), so a row's sample depends on the batch around it. With per-row keys, row n draws at
step t from fold_in(rng[n], t) alone: its output depends only on its own key and inputs, not on its
position, the batch size or how the batch is split over devices (what CapFilt needs to make the same
captions for an image wherever it lands).
Deliberate differences: the output is (B, max_new_tokens) new tokens with `pad_token_id` after EOS
and after an early stop (HF's beam search fills with `pad or eos[0]`, i.e. eos when pad == 0, and
crops to the longest row); only the best beam is returned (num_return_sequences = 1).
Float32 log-softmax / softmax / cumsum differ from torch's in the last ulp, so candidates within
~1e-6 of each other can be ordered differently; divisions by the penalties are kept as true
divisions (XLA would otherwise turn `x / c` into `x * (1 / c)`, which rounds differently).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from blip2_jax.core import xla
from blip2_jax.core.numerics import HINT, NonFiniteError

Array = jax.Array
StepFn = Callable[[Any, Array, Array], tuple[Array, Any]]

NEG = -1.0e9  # HF's "very large negative" beam score

# ----------------------------------------------------------------------------------------
# logits processors


def _div(x: Array, c) -> Array:
  """x / c as a true IEEE division (torch's `tensor / python_float`). XLA rewrites division by a
  broadcast scalar into multiplication by its reciprocal, which rounds differently; the barrier
  hides the broadcast."""
  d = lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(c, x.dtype), x.shape))
  return x / d


def _eos_tuple(eos_token_id) -> tuple[int, ...]:
  if eos_token_id is None:
    return ()
  if isinstance(eos_token_id, (int, np.integer)):
    return (int(eos_token_id),)
  return tuple(int(e) for e in eos_token_id)


def _isin(ids: Array, values: Sequence[int]) -> Array:
  out = jnp.zeros(ids.shape, bool)
  for v in values:
    out = out | (ids == v)
  return out


def _token_mask(ids: Array, valid: Array, vocab: int) -> Array:
  """(N, V) bool: which vocabulary entries occur at the valid positions of ids (N, S)."""
  n = ids.shape[0]
  cols = jnp.where(valid, jnp.clip(ids, 0, vocab), vocab)  # invalid -> spare column
  rows = jnp.broadcast_to(jnp.arange(n)[:, None], ids.shape)
  return jnp.zeros((n, vocab + 1), bool).at[rows, cols].set(True)[:, :vocab]


def repetition_penalty_(scores: Array, seen_ids: Array, valid: Array, penalty: float) -> Array:
  """HF RepetitionPenaltyLogitsProcessor: each token seen at a valid position, once."""
  hit = _token_mask(seen_ids, valid, scores.shape[-1])
  pen = jnp.where(scores < 0, scores * penalty, _div(scores, penalty))
  return jnp.where(hit, pen, scores)


def no_repeat_ngram_(scores: Array, seen_ids: Array, cur_len, n: int) -> Array:
  """HF NoRepeatNGramLogitsProcessor over seen_ids[:, :cur_len] (static buffer, dynamic length):
  every window whose first n-1 tokens equal the last n-1 tokens bans its last token."""
  num, s = seen_ids.shape
  if s < n:
    return scores
  w = s - n + 1  # window starts 0..w-1
  prefix = lax.dynamic_slice_in_dim(seen_ids, jnp.maximum(cur_len - n + 1, 0), n - 1, axis=1) \
      if n > 1 else seen_ids[:, :0]
  match = (jnp.arange(w) + n - 1 < cur_len)[None, :]  # window lies inside the sequence
  for j in range(n - 1):
    match = match & (seen_ids[:, j:j + w] == prefix[:, j:j + 1])
  match = match & (cur_len >= n)
  banned = _token_mask(seen_ids[:, n - 1:], match, scores.shape[-1])
  return jnp.where(banned, -jnp.inf, scores)


def process_logits(scores: Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   min_tokens_to_keep: int = 1, log_probs: bool = False) -> Array:
  """HF's sampling warpers in `_get_logits_processor` order: Temperature -> TopK -> TopP.
  Filtered entries are -inf, exactly as TemperatureLogitsWarper / TopKLogitsWarper /
  TopPLogitsWarper(min_tokens_to_keep) return them; `log_probs=True` gives the log-probabilities
  of the sampling distribution (log_softmax of that)."""
  scores = scores.astype(jnp.float32)
  vocab = scores.shape[-1]
  if temperature != 1.0:
    scores = _div(scores, temperature)
  if top_k and top_k != 0:
    k = min(max(int(top_k), min_tokens_to_keep), vocab)
    kth = lax.top_k(scores, k)[0][..., -1:]
    scores = jnp.where(scores < kth, -jnp.inf, scores)
  if top_p < 1.0:
    order = jnp.argsort(scores, axis=-1)  # ascending, as torch.sort(descending=False)
    srt = jnp.take_along_axis(scores, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
    remove = cum <= (1.0 - float(top_p))
    remove = remove & (jnp.arange(vocab) < vocab - min_tokens_to_keep)  # keep the last m
    rows = jnp.broadcast_to(jnp.arange(scores.shape[0])[:, None], order.shape)
    remove = jnp.zeros(scores.shape, bool).at[rows, order].set(remove)
    scores = jnp.where(remove, -jnp.inf, scores)
  if log_probs:
    scores = jax.nn.log_softmax(scores, axis=-1)
  return scores


def apply_processors(logits: Array, seen_ids: Array, seen_mask: Array, cur_len, *, prompt_len: int,
                     repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                     min_new_tokens: int = 0, eos_token_id=None, do_sample: bool = False,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     min_tokens_to_keep: int = 1) -> Array:
  """HF's processor list for these options, applied to (N, V) float32 scores.

  seen_ids (N, S): a static buffer whose first `cur_len` (traced scalar) positions are HF's
  `input_ids` ([context (prompt_len); generated]). seen_mask (N, S): positions the repetition
  penalty counts (HF: from the first attended context position on); the n-gram ban uses every
  position < cur_len. `min_new_tokens` bans EOS while cur_len - prompt_len < min_new_tokens."""
  scores = logits.astype(jnp.float32)
  eos = _eos_tuple(eos_token_id)
  inside = jnp.arange(seen_ids.shape[1])[None, :] < cur_len
  if repetition_penalty != 1.0:
    scores = repetition_penalty_(scores, seen_ids, inside & seen_mask.astype(bool),
                                 float(repetition_penalty))
  if no_repeat_ngram_size > 0:
    scores = no_repeat_ngram_(scores, seen_ids, cur_len, int(no_repeat_ngram_size))
  if min_new_tokens > 0 and eos:
    ban = _isin(jnp.arange(scores.shape[-1]), eos)[None, :] & (cur_len - prompt_len < min_new_tokens)
    scores = jnp.where(ban, -jnp.inf, scores)
  if do_sample:
    scores = process_logits(scores, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_tokens_to_keep=min_tokens_to_keep)
  return scores


# ----------------------------------------------------------------------------------------
# search


@dataclasses.dataclass(frozen=True)
class _Options:
  max_new_tokens: int
  min_new_tokens: int
  num_beams: int
  do_sample: bool
  temperature: float
  top_k: int
  top_p: float
  length_penalty: float
  repetition_penalty: float
  no_repeat_ngram_size: int
  eos: tuple[int, ...]
  pad: int
  early_stopping: Any

  def processors(self, min_tokens_to_keep):
    return dict(repetition_penalty=self.repetition_penalty,
                no_repeat_ngram_size=self.no_repeat_ngram_size, min_new_tokens=self.min_new_tokens,
                eos_token_id=self.eos, do_sample=self.do_sample, temperature=self.temperature,
                top_k=self.top_k, top_p=self.top_p, min_tokens_to_keep=min_tokens_to_keep)


def _finite_rows(logits: Array) -> Array:
  """(N,) bool: the model's raw logits of each row are all finite. Carried through the decode loop so
  that NaN weights or inputs are reported instead of decoded into arbitrary tokens (argmax over NaN)."""
  return jnp.all(jnp.isfinite(logits), axis=-1)


def _penalty_mask(context_mask: Array, g: int) -> Array:
  """(B, C+G): HF's repetition penalty skips positions before the first attended one."""
  m = context_mask.astype(bool)
  lead = jnp.argmax(m, axis=1)[:, None]  # first True (0 if none, as torch.argmax)
  ctx = jnp.arange(m.shape[1])[None, :] >= lead
  return jnp.concatenate([ctx, jnp.ones((m.shape[0], g), bool)], axis=1)


def per_row_keys(rng) -> bool:
  """Whether `rng` holds one key per row (typed keys (N,), raw uint32 keys (N, 2)) rather than one."""
  if rng is None:
    return False
  typed = jax.dtypes.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key)
  return np.ndim(rng) == (1 if typed else 2)


def _random(rng, t, fn, x):
  """fn(key, x) with step t's key: fold_in(rng, t) over the whole batch for one key; with per-row
  keys, row n computes fn(fold_in(rng[n], t), x[n]) alone."""
  if per_row_keys(rng):
    return jax.vmap(lambda k, xi: fn(jax.random.fold_in(k, t), xi))(rng, x)
  return fn(jax.random.fold_in(rng, t), x)


def _sample_or_greedy(step_fn, state, first_logits, ctx, ctx_mask, rng, o: _Options):
  b, c = ctx.shape
  g = o.max_new_tokens
  buf = jnp.concatenate([ctx, jnp.full((b, g), o.pad, jnp.int32)], axis=1)
  pen_mask = _penalty_mask(ctx_mask, g)
  procs = o.processors(1)

  def select(t, logits, buf, unfinished, ok):
    ok = ok & _finite_rows(logits)
    scores = apply_processors(logits, buf, pen_mask, c + t, prompt_len=c, **procs)
    if o.do_sample:
      tok = _random(rng, t, lambda key, s: jax.random.categorical(key, s, axis=-1), scores).astype(jnp.int32)
    else:
      tok = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    if o.eos:  # HF: finished rows get pad; a row finishes on an EOS token
      tok = jnp.where(unfinished, tok, o.pad)
      unfinished = unfinished & ~_isin(tok, o.eos)
    buf = lax.dynamic_update_slice_in_dim(buf, tok[:, None], c + t, axis=1)
    cont = jnp.any(unfinished) & (t + 1 < g) & jnp.all(ok)  # non-finite logits: stop, the caller raises
    return buf, unfinished, tok, ok, cont

  t0 = jnp.int32(0)
  buf, unf, tok, ok, cont = select(t0, first_logits, buf, jnp.ones((b,), bool), jnp.ones((b,), bool))

  def body(carry):
    state, buf, unf, tok, ok, t, _ = carry
    logits, state = step_fn(state, tok, t)
    buf, unf, tok, ok, cont = select(t + 1, logits, buf, unf, ok)
    return state, buf, unf, tok, ok, t + 1, cont

  carry = lax.while_loop(lambda cr: cr[-1], body, (state, buf, unf, tok, ok, t0, cont))
  return carry[1][:, c:], carry[4]


def _beam(step_fn, state, first_logits, ctx, ctx_mask, rng, o: _Options):
  b, c = ctx.shape
  g, k = o.max_new_tokens, o.num_beams
  s = c + g
  vocab = first_logits.shape[-1]
  keep = max(2, 1 + len(o.eos)) * k  # HF's beams_to_keep
  lp = float(o.length_penalty)
  # HF divides float32 scores by the python float (gen_len ** length_penalty).
  denom = jnp.asarray(np.array([float((t + 1) ** lp) for t in range(g)], np.float32))
  never_denom = np.float32(float(g ** lp))
  es_true = o.early_stopping is True
  procs = o.processors(len(o.eos) + 1 if o.do_sample else 1)

  state = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), state)
  # the step function may bring its own reorder (decoding's moves only what differs between beams)
  reorder = getattr(step_fn, "reorder", None) or (lambda st, idx: jax.tree.map(lambda x: x[idx], st))
  run_seq = jnp.broadcast_to(
      jnp.concatenate([ctx, jnp.full((b, g), o.pad, jnp.int32)], axis=1)[:, None], (b, k, s))
  pen_mask = jnp.repeat(_penalty_mask(ctx_mask, g), k, axis=0)
  run_scores = jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG)
  seqs = run_seq
  beam_scores = jnp.full((b, k), NEG, jnp.float32)
  fin = jnp.zeros((b, k), bool)
  heur = jnp.ones((b, 1), bool)
  top_mask = jnp.arange(keep) < k
  pos = jnp.arange(s)
  neg = lambda m: jnp.where(m, jnp.float32(NEG), jnp.float32(0.0))

  def gather(x, idx):  # (B, M, ...) by (B, J) along axis 1
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  def select(t, logits, run_seq, run_scores, seqs, beam_scores, fin, heur, ok):
    ok = ok & jnp.all(_finite_rows(logits).reshape(b, k), axis=1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = apply_processors(logp, run_seq.reshape(b * k, s), pen_mask, c + t, prompt_len=c, **procs)
    acc = (logp.reshape(b, k, vocab) + run_scores[:, :, None]).reshape(b, k * vocab)
    if o.do_sample:  # multinomial without replacement == Gumbel top-k
      gum = _random(rng, t, lambda key, a: jax.random.gumbel(key, a.shape, jnp.float32), acc)
      idx = lax.top_k(acc + gum, keep)[1]
      top_lp = jnp.take_along_axis(acc, idx, axis=1)
    else:
      top_lp, idx = lax.top_k(acc, keep)
    src, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
    top_seq = jnp.where(pos == c + t, tok[:, :, None], gather(run_seq, src))
    hits = _isin(tok, o.eos) | (t + 1 >= g)  # EOS or max-length criteria
    # running beams for the next step: the best k that did not stop
    run_lp = top_lp + neg(hits)
    nxt = lax.top_k(run_lp, k)[1]
    run_seq, run_scores, run_src = gather(top_seq, nxt), gather(run_lp, nxt), gather(src, nxt)
    # finished beams (HF `_update_finished_beams`)
    did = hits & top_mask[None, :]
    f = _div(top_lp, denom[t])
    f = f + neg(jnp.all(fin, axis=-1, keepdims=True) & es_true)
    f = f + neg(~heur)
    f = f + neg(~did)
    m_scores = jnp.concatenate([beam_scores, f], axis=1)
    mi = lax.top_k(m_scores, k)[1]
    seqs = gather(jnp.concatenate([seqs, top_seq], axis=1), mi)
    beam_scores = gather(m_scores, mi)
    fin = gather(jnp.concatenate([fin, did], axis=1), mi)
    # early-stop heuristic after cur_len += 1 (HF `_check_early_stop_heuristic`)
    d = never_denom if (o.early_stopping == "never" and lp > 0.0) else denom[t]
    best = _div(run_scores[:, :1], d)
    worst = jnp.where(fin, jnp.min(beam_scores, axis=1, keepdims=True), jnp.float32(NEG))
    heur = heur & jnp.any(best > worst, axis=-1, keepdims=True)
    cont = jnp.any(heur) & ~(jnp.all(fin) & es_true) & ~jnp.all(hits) & jnp.all(ok)
    beam_idx = (jnp.arange(b)[:, None] * k + run_src).reshape(-1)
    feed = lax.dynamic_index_in_dim(run_seq, c + t, axis=2, keepdims=False).reshape(-1)
    return (run_seq, run_scores, seqs, beam_scores, fin, heur, ok), beam_idx, feed, cont

  t0 = jnp.int32(0)
  beams, beam_idx, feed, cont = select(t0, jnp.repeat(first_logits, k, axis=0), run_seq, run_scores,
                                       seqs, beam_scores, fin, heur, jnp.ones((b,), bool))

  def body(carry):
    state, beams, beam_idx, feed, t, _ = carry
    state = reorder(state, beam_idx)  # HF reorder_cache
    logits, state = step_fn(state, feed, t)
    beams, beam_idx, feed, cont = select(t + 1, logits, *beams)
    return state, beams, beam_idx, feed, t + 1, cont

  carry = lax.while_loop(lambda cr: cr[-1], body, (state, beams, beam_idx, feed, t0, cont))
  seqs = carry[1][2]
  return seqs[:, 0, c:], carry[1][-1]


def _search_impl(step_fn, state, first_logits, context_ids, context_mask, rng, opts: _Options):
  context_ids = jnp.asarray(context_ids).astype(jnp.int32)
  context_mask = jnp.asarray(context_mask)
  first_logits = jnp.asarray(first_logits).astype(jnp.float32)
  if opts.num_beams > 1:
    return _beam(step_fn, state, first_logits, context_ids, context_mask, rng, opts)
  return _sample_or_greedy(step_fn, state, first_logits, context_ids, context_mask, rng, opts)


_search_jit = functools.lru_cache(maxsize=None)(lambda: xla.jit(_search_impl, static_argnums=(0, 6)))


def with_defaults(defaults: dict, options: dict) -> dict:
  """`defaults` updated by `options`. A default min_new_tokens above a max_new_tokens the caller set is
  lowered to it (LAVIS's caption minimum of 8 with max_new_tokens=5: 5); a min_new_tokens the caller
  set above it is kept, for `check_options` to refuse."""
  d = dict(defaults)
  if "max_new_tokens" in options and "min_new_tokens" not in options and "min_new_tokens" in d:
    d["min_new_tokens"] = min(d["min_new_tokens"], options["max_new_tokens"])
  return dict(d, **options)


def check_options(*, max_new_tokens: int = 30, min_new_tokens: int = 0, num_beams: int = 1,
                  do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  length_penalty: float = 1.0, repetition_penalty: float = 1.0,
                  no_repeat_ngram_size: int = 0, early_stopping=False, **_) -> None:
  """ValueError naming the option for a value HF would reject, silently ignore or turn into NaN scores:
  counts below their minimum, min_new_tokens above max_new_tokens (HF never reaches it and says
  nothing), a non-finite float (NaN / inf length_penalty, temperature, top_p, repetition_penalty)."""
  for name, v in (("temperature", temperature), ("top_p", top_p), ("length_penalty", length_penalty),
                  ("repetition_penalty", repetition_penalty)):
    if not np.isfinite(float(v)):
      raise ValueError(f"{name}={v}: must be a finite number")
  if early_stopping not in (True, False, "never"):
    raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
  if num_beams < 1 or max_new_tokens < 0 or min_new_tokens < 0 or no_repeat_ngram_size < 0:
    raise ValueError("num_beams >= 1, max_new_tokens >= 0, min_new_tokens >= 0 and no_repeat_ngram_size >= 0 "
                     "are required")
  if min_new_tokens > max_new_tokens:
    raise ValueError(f"min_new_tokens={min_new_tokens} is above max_new_tokens={max_new_tokens}: at most "
                     f"{max_new_tokens} tokens are generated, so the minimum cannot be met")
  if do_sample and (temperature <= 0 or not 0.0 <= top_p <= 1.0 or top_k < 0):
    raise ValueError("sampling needs temperature > 0, 0 <= top_p <= 1 and top_k >= 0")
  if repetition_penalty <= 0:
    raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def search(step_fn: StepFn, state, first_logits, context_ids, context_mask, *,
           max_new_tokens: int = 30, min_new_tokens: int = 0, num_beams: int = 1,
           do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           length_penalty: float = 1.0, repetition_penalty: float = 1.0,
           no_repeat_ngram_size: int = 0, eos_token_id=None, pad_token_id=None, rng=None,
           early_stopping=False, return_finite: bool = False):
  """Greedy / sampling / beam search / beam sampling as HF `generate` (transformers 5.23).

  first_logits (B, V): logits for the first new token (from the prefill, not beam-expanded).
  state: pytree with batch-leading leaves (expanded to B*num_beams and reordered for beams).
  step_fn(state, tokens (N,), step) -> (logits (N, V), state): feeds the token chosen at `step`.
  Beam search reorders the state with `step_fn.reorder(state, beam_idx)` when step_fn has that
  attribute (decoding's step functions do: they move only the cache slots beams do not share),
  else every leaf as `x[beam_idx]`.
  context_ids / context_mask (B, C): HF's `input_ids` / attention mask (what processors see).
  eos_token_id: int, list of ints or None; pad_token_id defaults to the first EOS (HF).
  early_stopping: True, False or "never" (HF semantics). rng: jax key, or one key per row of the
  batch (typed (B,) or raw (B, 2): see the module docstring), required to sample.
  Returns int32 (B, max_new_tokens): new tokens, pad after EOS / after the search stopped. With
  `return_finite`, (tokens, finite (B,) bool): whether every logit the model gave for that input (all
  its beams) was finite; the search stops at the first step where one was not (its tokens are then
  meaningless: callers raise, as `blip2_jax.generate` does).
  Options are checked by `check_options` and static: one compile per shape and option set for a
  given step_fn object (inside an outer jit, the search is traced inline into that program).
  """
  check_options(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                length_penalty=length_penalty, repetition_penalty=repetition_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size, early_stopping=early_stopping)
  eos = _eos_tuple(eos_token_id)
  pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
  if do_sample and rng is None:
    raise ValueError("do_sample=True needs rng (a jax.random key)")
  b = np.shape(context_ids)[0]
  if per_row_keys(rng) and np.shape(rng)[0] != b:
    raise ValueError(f"rng holds {np.shape(rng)[0]} per-row keys for a batch of {b} rows")
  if max_new_tokens == 0:
    empty = jnp.zeros((b, 0), jnp.int32)
    return (empty, jnp.all(jnp.isfinite(first_logits), axis=-1)) if return_finite else empty
  opts = _Options(int(max_new_tokens), int(min_new_tokens), int(num_beams), bool(do_sample),
                  float(temperature), int(top_k), float(top_p), float(length_penalty),
                  float(repetition_penalty), int(no_repeat_ngram_size), eos, int(pad),
                  early_stopping)
  args = (state, first_logits, context_ids, context_mask, rng)
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
    out = _search_impl(step_fn, *args, opts)  # already inside a trace: inline
  else:
    out = _search_jit()(step_fn, *args, opts)
  return out if return_finite else out[0]


def raise_if_not_finite(tokens, finite, what: str):
  """`tokens`, or NonFiniteError naming the inputs whose `what` were NaN / infinite (`finite`: (B,) bool
  from `search.search(..., return_finite=True)`). Inside a trace, `tokens` as they are."""
  if isinstance(finite, jax.core.Tracer):
    return tokens
  ok = np.asarray(finite)
  if not ok.all():
    rows = np.flatnonzero(~ok).tolist()
    shown = ", ".join(map(str, rows[:8])) + (" ..." if len(rows) > 8 else "")
    raise NonFiniteError(f"{what} are not finite (NaN or infinite) for {len(rows)} of {ok.size} inputs (batch rows "
                         f"{shown}): {HINT}; no tokens are returned")
  return tokens
