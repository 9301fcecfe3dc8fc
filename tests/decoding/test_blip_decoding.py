"""BLIP captioning (decoding/blip.py) against transformers 5.23 BlipForConditionalGeneration.generate.

Greedy and beam search are compared token for token with LAVIS's prompt "a picture of " from the
processor's tokenizer (a BERT wordpiece vocabulary written by tiny.tiny_blip_tokenizer, [DEC] added
as bos). Sampling cannot be compared draw by draw (torch's and JAX's random streams differ), so it
is compared as a distribution: the processed next-token distribution (repetition penalty, min
length, top-k, top-p as HF's processors) for fixed prefixes, and every sampled token must lie in
HF's support given the tokens before it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from transformers.generation import logits_process as lp

import blip2_jax
from blip2_jax import inference
from blip2_jax.decoding import blip as BD
from blip2_jax.decoding import search

from bounds import assert_close

SEP, PAD = 3, 0
N = 6  # images
SAMPLE = dict(do_sample=True, top_p=0.9, top_k=50, repetition_penalty=1.1)  # LAVIS nucleus + HF top_k


@pytest.fixture(scope="module")
def cap(tiny_checkpoint):
  d = tiny_checkpoint("BlipForConditionalGeneration", None)
  hf = T.BlipForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
  model, params = blip2_jax.from_pretrained(d)
  tok = T.AutoTokenizer.from_pretrained(d)
  px = np.random.default_rng(1).standard_normal((N, 28, 28, 3)).astype(np.float32)
  prompt = BD.prompt_ids(tok, BD.PROMPT, model.config.text.bos_token_id)
  return hf, model, params, tok, px, prompt


def _nchw(px):
  return torch.from_numpy(np.asarray(px)).permute(0, 3, 1, 2)


_HF = {}


def _hf_generate(cap, **kw):
  """HF's new tokens (after the prompt); each option set runs once per session."""
  key = tuple(sorted(kw.items()))
  if key not in _HF:
    _HF[key] = _run_hf(cap, **kw)
  return _HF[key]


def _run_hf(cap, **kw):
  hf, _, _, tok, px, prompt = cap
  enc = tok([BD.PROMPT] * len(px), return_tensors="pt")  # what BlipProcessor gives
  with torch.no_grad():
    out = hf.generate(pixel_values=_nchw(px), input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      **kw)
  np.testing.assert_array_equal(out[:, :len(prompt)].numpy(), np.tile(prompt, (len(px), 1)))  # [DEC] + prompt
  return out[:, len(prompt):].numpy()


def _assert_same(ours, ref):
  """Equal up to and including [SEP]; after it ours holds pad (HF's beam search fills with eos)."""
  ours = np.asarray(ours)
  for o, r in zip(ours, ref):
    n = next((i + 1 for i, t in enumerate(r) if t == SEP), len(r))
    np.testing.assert_array_equal(o[:n], r[:n])
    assert (o[n:] == PAD).all()


def _ours(cap, max_length, min_length=0, **kw):
  _, model, params, _, px, prompt = cap
  return BD.generate(model, params, px, prompt, **BD.lengths(len(prompt), max_length, min_length), **kw)


# greedy with LAVIS-like lengths; LAVIS's beam search (captions from 2 rows per image, equal); beams with
# every penalty
SETTINGS = [
    (dict(max_length=16, min_length=10, repetition_penalty=1.3), {}),
    (dict(num_beams=3, max_length=16, min_length=10), dict(num_captions=2)),
    (dict(num_beams=4, max_length=14, min_length=6, length_penalty=0.5, repetition_penalty=1.5,
          no_repeat_ngram_size=2, early_stopping=True), {}),
]


@pytest.mark.parametrize("kw,extra", SETTINGS, ids=["greedy", "lavis-beam", "beam-penalties"])
def test_generate_matches_hf(cap, kw, extra):
  ref = _hf_generate(cap, **kw)
  ours = np.asarray(_ours(cap, **kw, **extra))
  if extra.get("num_captions", 1) > 1:  # deterministic: every row of an image holds its caption
    np.testing.assert_array_equal(ours[0::2], ours[1::2])
    ours = ours[0::2]
  _assert_same(ours, ref)


def test_settings_exercise_the_options(cap):
  """Some captions end before max_length, and the penalties change what the model writes (each
  processor's own effect is tested on `search` in test_search.py)."""
  plain = _hf_generate(cap, max_length=16)
  ends = [np.flatnonzero(r == SEP) for r in plain]
  assert any(e.size and e[0] < plain.shape[1] - 1 for e in ends)
  assert (_hf_generate(cap, **SETTINGS[0][0]) != plain).any()
  assert (_hf_generate(cap, **SETTINGS[1][0])[:, :6] != _hf_generate(cap, **SETTINGS[2][0])[:, :6]).any()


# ----------------------------------------------------------------------------------------
# sampling


def _hf_scores(hf, px, seqs):
  """HF's next-token logits after every prefix of `seqs` (teacher forcing), float32 numpy."""
  with torch.no_grad():
    return hf(pixel_values=_nchw(px), input_ids=torch.from_numpy(seqs)).logits.numpy()


def _hf_processors(min_length, temperature=1.0, repetition_penalty=1.1):
  """What HF's generate applies when it samples with these options, in its order."""
  procs = [lp.RepetitionPenaltyLogitsProcessor(repetition_penalty)] if repetition_penalty != 1.0 else []
  procs.append(lp.MinLengthLogitsProcessor(min_length, SEP))
  procs += [lp.TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
  return lp.LogitsProcessorList(procs + [lp.TopKLogitsWarper(50), lp.TopPLogitsWarper(0.9)])


@pytest.mark.parametrize("temperature,penalty", [(1.0, 1.1), (0.7, 1.0)])
def test_nucleus_distribution_matches_hf_warpers(cap, temperature, penalty):
  """For fixed prefixes: the same support and probabilities as HF's processors give (LAVIS's nucleus
  settings; and with a temperature)."""
  hf, model, params, _, px, prompt = cap
  greedy = np.asarray(_ours(cap, **SETTINGS[0][0]))[:, :5]
  seqs = np.concatenate([np.tile(prompt, (N, 1)), np.where(greedy == PAD, 10, greedy)], axis=1).astype(np.int64)
  ours_logits = _forward(model)(params, jnp.asarray(px), jnp.asarray(seqs))
  ref_logits = _hf_scores(hf, px, seqs)
  opts = dict(SAMPLE, temperature=temperature, repetition_penalty=penalty)
  process = jax.jit(lambda logits, seqs, cur_len: search.apply_processors(
      logits, seqs, jnp.ones(seqs.shape, bool), cur_len, prompt_len=len(prompt), min_new_tokens=10 - len(prompt),
      eos_token_id=SEP, **opts))
  for t in (len(prompt) - 1, len(prompt) + 2, seqs.shape[1] - 1):  # after the prompt, 3 and 5 tokens
    want = _hf_processors(10, temperature, penalty)(torch.from_numpy(seqs[:, :t + 1]),
                                                    torch.from_numpy(ref_logits[:, t].copy())).numpy()
    got = np.asarray(process(ours_logits[:, t], jnp.asarray(seqs), t + 1))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))  # the same support
    assert 1 < np.isfinite(want).sum(axis=1).min() and np.isfinite(want).sum(axis=1).max() < 100
    # measured up to 9.1e-7 on probabilities (to 0.59)
    assert_close(jax.nn.softmax(got, -1), torch.softmax(torch.from_numpy(want), -1), f"top-p probabilities at {t}")


_FORWARD = {}


def _forward(model):
  if model not in _FORWARD:
    _FORWARD[model] = jax.jit(lambda p, x, i: model.apply({"params": p}, x, i)["logits"])
  return _FORWARD[model]


@pytest.fixture(scope="module")
def samples(cap):
  """4 captions of each image with LAVIS's nucleus settings and one key per image."""
  _, model, params, _, px, prompt = cap
  keys = jax.random.split(jax.random.key(7), N)
  out = _ours(cap, 30, 10, num_captions=4, rng=keys, **SAMPLE)
  return keys, np.asarray(out)


def test_blip_captions_are_the_samples_without_the_prompt(cap, samples, tiny_checkpoint):
  """inference.blip_captions (CapFilt's defaults are these samples' options: the same program):
  image-major lists of strings, the prompt stripped as LAVIS does."""
  _, model, params, tok, px, prompt = cap
  keys, out = samples
  caps = inference.blip_captions(model, params, tok, px, keys=keys, num_captions=4)
  want = [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
  assert [len(c) for c in caps] == [4] * N and [c for row in caps for c in row] == want
  full = tok.batch_decode(np.concatenate([np.tile(prompt, (len(out), 1)), out], 1), skip_special_tokens=True)
  assert [f[len(BD.PROMPT):].strip() for f in full] == want  # LAVIS: caption[len(prompt):]
  assert all(c and not c.startswith("a picture of") for c in want)
  with pytest.raises(ValueError, match="sampling needs keys"):
    inference.blip_captions(model, params, tok, px)
  with pytest.raises(TypeError, match="BLIP captioning needs"):
    filt, fparams = blip2_jax.from_pretrained(tiny_checkpoint("BlipForImageTextRetrieval", None))
    inference.blip_captions(filt, fparams, tok, px, keys=keys)


def test_sampled_tokens_lie_in_hf_support(cap, samples):
  hf, _, _, _, px, prompt = cap
  _, out = samples
  p = len(prompt)
  seqs = np.concatenate([np.tile(prompt, (len(out), 1)), out], axis=1).astype(np.int64)
  logits = _hf_scores(hf, np.repeat(px, 4, axis=0), seqs)
  alive = np.ones(len(out), bool)
  for t in range(out.shape[1]):
    scores = _hf_processors(10)(torch.from_numpy(seqs[:, :p + t]), torch.from_numpy(logits[:, p + t - 1].copy()))
    chosen = scores.numpy()[np.arange(len(out)), out[:, t]]
    assert np.isfinite(chosen[alive]).all(), t
    alive &= out[:, t] != SEP
  assert len({tuple(r) for r in out}) == len(out)  # rows of one image differ: they sample


def test_per_image_keys_make_captions_independent_of_the_batch(cap, samples):
  """Image n's captions come from its key alone: the same in another batch order (same shapes,
  no new compile); independence of the batch size is shown on `search` itself (test_row_keys.py)."""
  _, model, params, _, px, prompt = cap
  keys, out = samples
  perm = np.array([3, 0, 5, 1, 4, 2])
  again = np.asarray(BD.generate(model, params, px[perm], prompt, **BD.lengths(len(prompt), 30, 10),
                                 num_captions=4, rng=keys[perm], **SAMPLE))
  np.testing.assert_array_equal(again.reshape(N, 4, -1), out.reshape(N, 4, -1)[perm])


def test_prompt_ids_and_lengths(cap):
  _, model, _, tok, _, prompt = cap
  assert list(tok(BD.PROMPT)["input_ids"]) == [2, *prompt[1:], SEP]  # [CLS] a picture of [SEP]
  assert prompt[0] == model.config.text.bos_token_id == tok.bos_token_id == 98
  np.testing.assert_array_equal(BD.prompt_ids(tok, "", 98), [98])
  assert BD.lengths(4, 30, 10) == dict(max_new_tokens=26, min_new_tokens=6)
  with pytest.raises(ValueError, match="no new token"):
    BD.lengths(4, 4)
