"""Generation and scoring that used to run past the model or report NaN as a result: the LLM's positions
(OPT's learned table, LLaMA's trained length, InstructBLIP's and stage 1's Q-Former table), generation
options that were ignored or turned into NaN, and a checkpoint whose weights are NaN (captions,
retrieval, evaluation, the metrics)."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import blip2_jax
from blip2_jax import evaluation, inference
from blip2_jax.checkpoints import hf, tiny
from blip2_jax.cli import caption, evaluate, retrieve, vqa
from blip2_jax.core.numerics import NonFiniteError
from blip2_jax.decoding import qformer as qformer_decoding
from blip2_jax.decoding import search
from blip2_jax.models import blip2

from helpers import count_traces, run_cli, usage_error

GEN = ["--num-beams", "3", "--max-new-tokens", "5", "--min-new-tokens", "2", "--batch-size", "2"]  # as test_cli_inference


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
  from PIL import Image
  d = tmp_path_factory.mktemp("imgs")
  rng = np.random.default_rng(0)
  for n in ("a.png", "b.png"):
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(d / n)
  return d


def _nan_copy(src, dst):
  """A copy of checkpoint `src` whose floating-point weights are all NaN (as a diverged run leaves them)."""
  shutil.copytree(src, dst)
  w = load_file(os.path.join(dst, "model.safetensors"))
  save_file({k: np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating) else v for k, v in w.items()},
            os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  return dst


@pytest.fixture(scope="module")
def nan_ckpt(tiny_checkpoint, tmp_path_factory):
  root = tmp_path_factory.mktemp("nan")
  return {"opt": _nan_copy(tiny_checkpoint("Blip2ForConditionalGeneration", "opt"), root / "opt"),
          "ret": _nan_copy(tiny_checkpoint("Blip2ForImageTextRetrieval", None), root / "ret")}


@pytest.fixture
def no_weights(monkeypatch):
  """Fails the test if a command loads weights: its check must come first."""
  monkeypatch.setattr(hf, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded before the check"))


def _config(family, **kw):
  return blip2.Blip2Config.from_hf(tiny.tiny_blip2_config(family, **kw))


# ----------------------------------------------------------------------------------------
# context length


def test_positions_checked_before_any_work_at_the_command_line(tiny_checkpoint, imgs, capsys, no_weights):
  """The tiny OPT has 64 learned positions and 4 queries; the prompt "a photo of" is 4 tokens (BOS + 3).
  --max-new-tokens 100000 --min-new-tokens 100 used to run for minutes past the table."""
  d = tiny_checkpoint("Blip2ForConditionalGeneration", "opt")
  base = ["--model", d, imgs / "a.png"]
  usage_error(caption.main, base + ["--max-new-tokens", "100000", "--min-new-tokens", "100"], capsys,
              "4 query + 4 prompt + 100000 new tokens = 100008 positions, but the OPT language model has 64 positions "
              "(max_position_embeddings, learned); at most 56 new tokens fit this prompt")
  usage_error(caption.main, base + ["--max-new-tokens", "100"], capsys, "= 108 positions", "at most 56 new tokens")
  usage_error(caption.main, base + ["--prompt", "a " * 10000], capsys,
              "4 query + 10001 prompt + 30 new tokens = 10035 positions", "the queries and the prompt alone take 10005: "
              "shorten the prompt")
  usage_error(caption.main, base + ["--max-new-tokens", "5", "--min-new-tokens", "10"], capsys,
              "min_new_tokens=10 is above max_new_tokens=5: at most 5 tokens are generated")
  usage_error(vqa.main, ["--model", d, "--image", imgs / "a.png", "--question", "what " * 60], capsys,
              "4 query + 65 prompt + 10 new tokens = 79 positions")
  usage_error(vqa.main, ["--model", d, "--image", imgs / "a.png", "--question", "what", "--length-penalty", "nan"],
              capsys, "argument --length-penalty: must be a finite number, got nan")
  ann = imgs / "vqa.json"
  ann.write_text(json.dumps([{"image": "a.png", "question": "what " * 60, "answer": ["x"]}]))
  usage_error(evaluate.main, ["--task", "vqa", "--model", d, "--annotations", ann, "--images-dir", imgs], capsys,
              "4 query + 55 prompt + 10 new tokens = 69 positions, but the OPT")  # pre_question keeps 50 words
  ret = tiny_checkpoint("Blip2ForImageTextRetrieval", None)
  (imgs / "texts.txt").write_text("a dog\n")
  usage_error(retrieve.main, ["--model", ret, "--images-dir", imgs, "--texts", imgs / "texts.txt", "--max-text-len",
                              "100"], capsys, "--max-text-len 100: the Q-Former has 64 positions")


def test_generate_refuses_before_compiling(tiny_checkpoint):
  model, params = blip2_jax.from_pretrained(tiny_checkpoint("Blip2ForConditionalGeneration", "opt"))
  px = np.zeros((1, 28, 28, 3), np.float32)
  ids = np.array([[2, 5, 6, 0, 0]]), np.array([[1, 1, 1, 0, 0]])  # 3 real tokens, right of them padding
  with count_traces() as traces:
    with pytest.raises(ValueError, match=r"^4 query \+ 3 prompt \+ 100 new tokens = 107 positions, but the OPT "):
      blip2_jax.generate(model, params, px, *ids, max_new_tokens=100)
    for bad, msg in ((dict(max_new_tokens=5, min_new_tokens=6), "min_new_tokens=6 is above max_new_tokens=5"),
                     (dict(num_beams=3, length_penalty=float("nan")), "length_penalty=nan: must be a finite number"),
                     (dict(do_sample=True, temperature=float("inf")), "temperature=inf: must be a finite number"),
                     (dict(top_p=float("nan")), "top_p=nan"), (dict(repetition_penalty=float("-inf")),
                                                               "repetition_penalty=-inf")):
      with pytest.raises(ValueError, match=msg):
        blip2_jax.generate(model, params, px, *ids, rng=np.zeros(2, np.uint32), **bad)
  assert traces == []  # nothing was traced, let alone compiled
  with pytest.raises(ValueError, match=r"= 105 positions.*at most 59 new tokens"):  # no prompt: [queries; BOS]
    blip2_jax.generate(model, params, px, max_new_tokens=100)


def test_limits_per_family():
  """OPT and LLaMA: max_position_embeddings (learned / rotary, trained). T5: relative positions, no limit.
  InstructBLIP's and stage 1's Q-Former: its learned table (64 in the tiny configs)."""
  assert inference.position_limit(_config("opt")) == (64, "OPT language model has 64 positions "
                                                          "(max_position_embeddings, learned)")
  assert inference.position_limit(_config("llama"))[0] == 128
  with pytest.raises(ValueError, match="but the LLaMA language model has 128 positions .*rotary, trained"):
    inference.check_context(_config("llama"), 5, 120)
  assert inference.position_limit(_config("t5"))[0] is None
  inference.check_context(_config("t5"), 5000, 5000)  # not refused
  cfg = _config("llama", instruct=True)
  llm_tok, q_tok = tiny.tiny_tokenizer("llama"), tiny.tiny_tokenizer("bert")
  with pytest.raises(ValueError, match="the prompt is 102 Q-Former tokens, but InstructBLIP's Q-Former has 64 positions"):
    inference.check_generation(cfg, llm_tok, ["a " * 100], "caption", qformer_tokenizer=q_tok, max_new_tokens=2)
  # a default minimum above the maximum asked for is lowered to it; one asked for is refused
  opts = inference.check_generation(_config("opt"), tiny.tiny_tokenizer("opt"), ["a photo of"], "caption",
                                    max_new_tokens=5)
  assert (opts["min_new_tokens"], opts["max_new_tokens"]) == (5, 5)
  ret = _config(None, qformer_overrides={})
  with pytest.raises(ValueError, match=r"\[DEC\] \+ 100 new tokens = 101 positions, but the Q-Former has 64"):
    qformer_decoding.checked_options(ret, max_new_tokens=100)
  assert qformer_decoding.checked_options(ret, max_new_tokens=5)["min_new_tokens"] == 5


# ----------------------------------------------------------------------------------------
# non-finite logits, features and scores


def test_search_stops_and_flags_non_finite_logits():
  """The flag the decode loop carries: a row whose logits turn NaN at step 2 is reported (all its beams
  in beam search) and the loop stops there instead of running to max_new_tokens."""
  vocab = 6

  def step_fn(state, tokens, step):
    t = state["t"] + 1
    logits = jnp.tile(jnp.arange(vocab, dtype=jnp.float32)[None], (tokens.shape[0], 1))
    bad = (t >= 2) & (jnp.arange(tokens.shape[0]) // state["per"] == 1)
    return jnp.where(bad[:, None], jnp.nan, logits), {"t": t, "per": state["per"]}

  first = jnp.zeros((2, vocab), jnp.float32)
  ctx, mask = jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1), jnp.int32)
  for beams in (1, 3):
    state = {"t": jnp.zeros((2,), jnp.int32), "per": jnp.full((2,), beams, jnp.int32)}
    tokens, finite = search.search(step_fn, state, first, ctx, mask, max_new_tokens=50, num_beams=beams,
                                   return_finite=True)
    assert np.asarray(finite).tolist() == [True, False]
    with pytest.raises(NonFiniteError, match=r"for 1 of 2 inputs \(batch rows 1\)"):
      search.raise_if_not_finite(tokens, finite, "logits")
    if beams == 1:  # tokens 0 (first logits), 5, 5, then the loop stopped: pad (0) to the end
      assert np.asarray(tokens)[0].tolist() == [0, 5, 5] + [0] * 47


def _error_line(err):
  """The one "error:" line of a failed command's stderr; the rest are progress bars (cleared on a terminal)."""
  errors = [ln for ln in err if "error" in ln]
  assert len(errors) == 1 and errors[0] == err[-1] and not any("Traceback" in ln for ln in err), err
  return errors[0]


def test_nan_weights_caption_is_one_line_exit_1(nan_ckpt, imgs, tmp_path, capsys):
  out = tmp_path / "caps.jsonl"
  code, printed, err = run_cli(caption.main, ["--model", nan_ckpt["opt"], "--images-dir", imgs, "--output", out,
                                              *GEN], capsys)
  assert code == 1 and printed == "" and not out.exists()
  assert _error_line(err) == ("error: the language model's logits are not finite (NaN or infinite) for 2 of 2 inputs "
                              "(batch rows 0, 1): the model's weights or its inputs hold NaN / inf; no tokens are returned")


def test_nan_weights_retrieval_is_one_line_exit_1(nan_ckpt, imgs, tmp_path, capsys):
  """evaluate --task retrieval on NaN weights reported R@1 50% (every tie ranks the match first) and exit 0."""
  ann = tmp_path / "ret.json"
  ann.write_text(json.dumps([{"image": "a.png", "caption": ["a red car"]}, {"image": "b.png", "caption": ["a dog"]}]))
  out = tmp_path / "r.json"
  code, printed, err = run_cli(evaluate.main, ["--task", "retrieval", "--model", nan_ckpt["ret"], "--annotations", ann,
                                               "--images-dir", imgs, "--k", "2", "--output", out], capsys)
  assert code == 1 and printed == "" and not out.exists()
  line = ("error: image features of 2 images: 192 of 192 values are not finite (192 NaN); the model's weights or its "
          "inputs hold NaN / inf")  # 2 images x 4 queries x 24 features
  assert _error_line(err) == line
  (tmp_path / "t.txt").write_text("a red car\na dog\n")
  code, printed, err = run_cli(retrieve.main, ["--model", nan_ckpt["ret"], "--images-dir", imgs, "--texts",
                                               tmp_path / "t.txt", "--k", "2"], capsys)
  assert code == 1 and printed == "" and _error_line(err) == line


def test_nan_in_one_tower_stops_greedy_generation(tiny_checkpoint):
  """NaN only in the LLM's final norm: the image path is finite, the logits are not."""
  model, params = blip2_jax.from_pretrained(tiny_checkpoint("Blip2ForConditionalGeneration", "opt"))
  lm = params["language_model"]["model"]["decoder"]
  lm["final_layer_norm"]["scale"] = jnp.full_like(lm["final_layer_norm"]["scale"], jnp.nan)
  px = np.zeros((2, 28, 28, 3), np.float32)
  with pytest.raises(NonFiniteError, match=r"language model's logits are not finite .* for 2 of 2 inputs"):
    blip2_jax.generate(model, params, px, max_new_tokens=4)


def test_metrics_refuse_non_finite_scores():
  """retrieval_recall on an all-NaN matrix gave 100%."""
  t2i, i2t = evaluation.coco_style_maps([1, 1, 1])
  with pytest.raises(NonFiniteError, match=r"^retrieval scores: 9 of 9 values are not finite \(9 NaN\)"):
    evaluation.retrieval_recall(np.full((3, 3), np.nan), t2i, i2t)
  sim = np.eye(3)
  sim[1, 2] = np.inf
  with pytest.raises(NonFiniteError, match=r"1 of 9 values are not finite \(1 infinite\)"):
    evaluation.retrieval_recall(sim, t2i, i2t)
  assert evaluation.retrieval_recall(np.eye(3) - 100 * (1 - np.eye(3)), t2i, i2t)["r_mean"] == 100.0
