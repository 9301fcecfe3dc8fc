"""Stage 1 / stage 2 losses against PyTorch computations of the same formulas (LAVIS 1.0.2
`blip2_qformer.py` / `blip2_opt.py` written out with HF modules in tests/torch_ref.py; HF
Blip2ForConditionalGeneration's own loss) on the same tiny random weights, float32.

Measured max abs diffs (CPU, jax 0.10.2 vs torch 2.13; the bounds are tests/bounds.py's float32
goal, 1e-5 x the largest |reference|):
  stage 1 (B 4, explicit negatives): ITC 2.4e-7 (value 1.39), ITM 0 (0.64), ITG 9.5e-7 (4.60)
  ITC gradient vs LAVIS on 2 / 3 simulated devices and vs full gradient: features <= 1.2e-7
    (|g| up to 0.97), temp <= 1.7e-6 (|g| up to 15), loss value <= 2.4e-7
  stage 2 vs HF forward(labels=...).loss: OPT + prompt 0, LLaMA 0, T5 4.8e-7 (losses ~5.4)
  stage 2 vs Blip2OPT.forward, byte-level BPE, prompt masks "lavis" / "exact": 0 / 4.8e-7 (~5.4)
The tiny retrieval model's query features barely depend on the image, so its ITC sits at ln 4;
the ITC formula and gradient are checked on random features in test_itc_gradient_*.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T

import blip2_jax
from blip2_jax.checkpoints import io, tiny
from blip2_jax.models import qformer as Q
from blip2_jax.train import losses

import torch_ref
from bounds import assert_close, bound

B, TXT, BOS, TEMP = 4, 7, 98, 0.07  # BOS = [DEC] of tiny.tiny_tokenizer("bert")


def _j(t):
  return jnp.asarray(t.detach().numpy())


# ----------------------------------------------------------------------------------------
# stage 1


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  # 2 Q-Former layers (one with cross-attention) and 1 ViT layer keep the backward compile short
  d = tiny.save_tiny(str(tmp_path_factory.mktemp("ret")), "Blip2ForImageTextRetrieval",
                        qformer_overrides=dict(num_hidden_layers=2),
                        vision_overrides=dict(num_hidden_layers=1))
  hf = T.Blip2ForImageTextRetrieval.from_pretrained(d, attn_implementation="eager").eval()
  model, params = blip2_jax.from_pretrained(d)
  qc = hf.config.qformer_config
  # ITG head: BERT cls.predictions (HF transform module) tied to the Q-Former word embeddings
  torch.manual_seed(1)
  transform = T.models.bert.modeling_bert.BertPredictionHeadTransform(T.BertConfig(
      hidden_size=qc.hidden_size, hidden_act=qc.hidden_act, layer_norm_eps=qc.layer_norm_eps))
  tiny.perturb_(transform, seed=1)
  head_bias = torch.randn(qc.vocab_size) * 0.3
  sd = {f"transform.{k}": v.numpy() for k, v in transform.state_dict().items()}
  sd["bias"] = head_bias.numpy()
  head = Q.QFormerLMHead(model.config.qformer)
  lm_params = io.load_params(io.DictReader(sd), Q.lm_head_hf_rules(model.config.qformer, prefix=""),
                             io.abstract_params(head, jnp.zeros((1, 1, qc.hidden_size))))
  # inputs: [CLS] words [SEP] [PAD]..., rows of different lengths
  g = torch.Generator().manual_seed(0)
  px = torch.randn(B, 3, 28, 28, generator=g)
  ids = torch.randint(5, 98, (B, TXT), generator=g)
  mask = torch.ones(B, TXT, dtype=torch.long)
  for i, n in enumerate((7, 5, 3, 6)):
    ids[i, 0], ids[i, n - 1] = 2, 3
    ids[i, n:], mask[i, n:] = 0, 0
  batch = {"pixel_values": _j(px.permute(0, 2, 3, 1)), "input_ids": _j(ids), "attention_mask": _j(mask)}
  return dict(hf=hf, transform=transform, head_bias=head_bias, model=model, params=params,
              lm_params=lm_params, px=px, ids=ids, mask=mask, batch=batch)


def _torch_stage1(s, neg_img, neg_txt, temp=TEMP):
  hf = s["hf"]
  word = hf.embeddings.word_embeddings.weight
  out = torch_ref.stage1_losses(hf, lambda h: s["transform"](h) @ word.T + s["head_bias"], s["px"], s["ids"],
                                s["mask"], temp=temp, bos_token_id=BOS, neg_img=neg_img, neg_txt=neg_txt)
  return out["itc"], out["itm"], out["itg"]


NEG_IMG, NEG_TXT = [2, 0, 3, 1], [1, 3, 0, 2]  # explicit, non-positive


def _ours(s, **kw):
  f = jax.jit(lambda p, lp, t, b: losses.stage1_losses(
      s["model"], p, lp, t, b, bos_token_id=BOS, neg_image_idx=jnp.array(NEG_IMG),
      neg_text_idx=jnp.array(NEG_TXT), **kw))
  return f(s["params"], s["lm_params"], jnp.float32(TEMP), s["batch"])


def test_stage1_matches_torch(stage1):
  with torch.no_grad():
    ref = [float(x) for x in _torch_stage1(stage1, NEG_IMG, NEG_TXT)]
  total, parts = _ours(stage1)
  got = [float(parts[k]) for k in ("itc", "itm", "itg")]
  # measured: itc 2.4e-7 (value 1.39), itm 0 (0.64), itg 9.5e-7 (4.60)
  for name, a, b in zip(("itc", "itm", "itg"), got, ref):
    assert_close(a, b, name)
  assert_close(float(total), sum(ref), "total")


@pytest.mark.parametrize("ranks,full", [(2, False), (3, False), (1, True)])
def test_itc_gradient_matches_lavis_ddp(ranks, full):
  """Gradient w.r.t. the features and temp (everything upstream follows by the chain rule):
  LAVIS on `ranks` simulated devices (gathered copies detached, DDP averages the gradients) vs
  ours on the global batch of 6; full=True: one device, nothing detached."""
  g = torch.Generator().manual_seed(ranks)
  img = F.normalize(torch.randn(6, 4, 24, generator=g), dim=-1).requires_grad_(True)
  txt = F.normalize(torch.randn(6, 24, generator=g), dim=-1).requires_grad_(True)
  temp = torch.tensor(0.1, requires_grad=True)
  loss = torch_ref.itc(img, txt, temp, ranks=ranks, detach=not full)
  loss.backward()

  def f(i, t, tp, full_gradient):
    return losses.itc_loss(i, t, tp, full_gradient=full_gradient)[0]
  args = (_j(img), _j(txt), jnp.float32(0.1))
  val, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(*args, full)
  assert_close(float(val), float(loss.detach()), "loss")  # measured <= 2.4e-7 (loss ~2)
  # measured: features <= 1.2e-7 (|g| up to 0.97), temp <= 1.7e-6 (|g| up to 15: float32
  # round-off of the cancelling s / temp^2 terms)
  for got, ref, name in zip(grads, (img.grad, txt.grad, temp.grad), ("image grad", "text grad", "temp grad")):
    assert_close(got, ref, name)
  # the two modes give different feature gradients, so the test tells them apart
  other = jax.grad(f, argnums=(0, 1))(*args, not full)
  assert float(jnp.max(jnp.abs(other[1] - grads[1]))) > 1e-2


def test_stage1_grad_with_sampling_and_dropout(stage1):
  s = stage1

  def total(qf, p, rng):
    p = dict(p, qformer=qf)
    return losses.stage1_losses(s["model"], p, s["lm_params"], jnp.float32(TEMP), s["batch"], rng,
                                bos_token_id=BOS, deterministic=False)
  (val, parts), g = jax.jit(jax.value_and_grad(total, has_aux=True))(
      s["params"]["qformer"], s["params"], jax.random.key(0))
  leaves = jax.tree.leaves(g)
  assert np.isfinite(float(val)) and all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
  assert sum(float(jnp.sum(jnp.abs(x))) for x in leaves) > 0
  assert np.isclose(float(val), sum(float(v) for v in parts.values()), atol=1e-5)


def test_hard_negative_sampler():
  rng = np.random.default_rng(0)
  sim = jnp.asarray(rng.normal(size=(5, 5)) * 3, jnp.float32)
  probs = np.asarray(losses.hard_negative_probs(sim))
  sm = np.exp(sim - sim.max(1, keepdims=True))
  sm = sm / sm.sum(1, keepdims=True) + 1e-4  # LAVIS 1.0.2: softmax + 1e-4, positive zeroed
  np.fill_diagonal(sm, 0)
  np.testing.assert_allclose(probs, sm / sm.sum(1, keepdims=True), rtol=1e-5)
  n = 20000
  keys = jax.random.split(jax.random.key(1), n)
  neg_img, neg_txt = jax.jit(jax.vmap(lambda k: losses.sample_hard_negatives(k, sim, sim.T)))(keys)
  # negative images per text come from sim_t2i = sim.T, negative texts per image from sim_i2t = sim
  probs_t = np.asarray(losses.hard_negative_probs(sim.T))
  for draws, p in ((np.asarray(neg_img), probs_t), (np.asarray(neg_txt), probs)):
    assert not np.any(draws == np.arange(5)[None]), "a positive was sampled"
    freq = np.stack([np.bincount(draws[:, i], minlength=5) / n for i in range(5)])
    sigma = np.sqrt(p * (1 - p) / n) + 1e-9
    assert np.all(np.abs(freq - p) <= 5 * sigma + 1e-4), np.max(np.abs(freq - p) / sigma)
  # deterministic in the key
  a = losses.sample_hard_negatives(jax.random.key(3), sim, sim.T)
  b = losses.sample_hard_negatives(jax.random.key(3), sim, sim.T)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_cross_entropy_matches_torch():
  g = torch.Generator().manual_seed(0)
  logits = torch.randn(3, 5, 11, generator=g) * 3
  labels = torch.randint(0, 11, (3, 5), generator=g)
  labels[0, 2:] = -100
  for ls in (0.0, 0.1):
    ref = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), label_smoothing=ls)
    got = losses.cross_entropy(_j(logits).astype(jnp.bfloat16).astype(jnp.float32), _j(labels),
                               label_smoothing=ls)
    ref_bf = F.cross_entropy(logits.bfloat16().float().reshape(-1, 11), labels.reshape(-1), label_smoothing=ls)
    assert_close(float(got), float(ref_bf), f"cross entropy, smoothing {ls}")
    assert abs(float(ref) - float(ref_bf)) < 0.05
  assert float(losses.cross_entropy(jnp.zeros((2, 3)), jnp.array([-100, -100]))) == 0.0


# ----------------------------------------------------------------------------------------
# stage 2

CAPTIONS = ["a cat sitting on the grass", "two dogs", "a red car next to a big tree near the house"]


@pytest.mark.parametrize("family,prompt", [("opt", "a photo of"), ("llama", ""), ("t5", "")])
def test_stage2_matches_hf(tmp_path, family, prompt):
  d = tiny.save_tiny(str(tmp_path), "Blip2ForConditionalGeneration", family)
  hf = T.Blip2ForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
  tok = T.AutoTokenizer.from_pretrained(d)
  model, params = blip2_jax.from_pretrained(d)
  text = losses.build_stage2_batch(tok, CAPTIONS, family, prompt=prompt, max_len=10, prefix_ratio=0.4)
  px = torch.randn(len(CAPTIONS), 3, 28, 28, generator=torch.Generator().manual_seed(0))
  batch = dict(text, pixel_values=_j(px.permute(0, 2, 3, 1)))
  loss, aux = jax.jit(lambda p, b: losses.stage2_loss(model, p, b))(params, batch)
  # HF v5: num_query_tokens <image> placeholders before the text; their labels -100
  nq = hf.config.num_query_tokens
  img_tok = torch.full((len(CAPTIONS), nq), hf.config.image_token_index)
  ids = torch.as_tensor(text["input_ids"]).long()
  mask = torch.as_tensor(text["attention_mask"]).long()
  labels = torch.as_tensor(text["labels"]).long()
  kw = dict(pixel_values=px, input_ids=torch.cat([img_tok, ids], 1),
            attention_mask=torch.cat([torch.ones_like(img_tok), mask], 1))
  if family == "t5":
    kw.update(labels=labels, decoder_attention_mask=torch.as_tensor(text["decoder_attention_mask"]).long())
  else:
    kw.update(labels=torch.cat([torch.full_like(img_tok, -100), labels], 1))
  with torch.no_grad():
    ref = float(hf(**kw).loss)
  # measured: opt + prompt 0, llama 0, t5 4.8e-7 (losses ~5.4)
  assert_close(float(loss), ref, "stage-2 loss")
  assert int(aux["num_tokens"]) == int((labels != -100).sum())


def test_stage2_prompt_mask_matches_lavis(tmp_path):
  """Blip2OPT.forward's loss (torch_ref.opt_loss: LAVIS's text processor prepends "a photo of " to
  each caption; prompt_length counts the model's prompt tokenised alone) with a byte-level BPE
  tokenizer, where a trailing space is a token of its own. prompt_mask="lavis" is LAVIS with the
  prompt as given; "exact" is LAVIS with the prompt without the space (LAVIS's caption configs)."""
  d = tiny.save_tiny(str(tmp_path), "Blip2ForConditionalGeneration", "opt", tokenizer=False)
  hf = T.Blip2ForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
  model, params = blip2_jax.from_pretrained(d)
  texts = ["a photo of " + c for c in CAPTIONS]  # as LAVIS's text processor gives them
  tok = torch_ref.byte_level_tokenizer([t + "\n" for t in texts])
  assert tok.convert_ids_to_tokens(tok("a photo of ").input_ids)[-1] == "Ġ"
  px = torch.randn(len(CAPTIONS), 3, 28, 28, generator=torch.Generator().manual_seed(0))
  loss = jax.jit(lambda p, b: losses.stage2_loss(model, p, b)[0])

  def ours(prompt, prompt_mask):
    text = losses.build_stage2_batch(tok, CAPTIONS, "opt", prompt=prompt, prompt_mask=prompt_mask)
    return float(loss(params, dict(text, pixel_values=_j(px.permute(0, 2, 3, 1)))))

  def lavis(model_prompt):
    with torch.no_grad():
      return float(torch_ref.opt_loss(hf, px, texts, tok, model_prompt))
  with_space, without = lavis("a photo of "), lavis("a photo of")
  # measured: 0 (lavis, with the space) and 4.8e-7 (the rest; losses ~5.4). The two LAVIS prompts
  # differ by 3.7e-2 (6.7e-3 relative): what "exact", the only masking before, gave against LAVIS
  assert_close(ours("a photo of ", "lavis"), with_space, "lavis mask, prompt with its space")
  assert_close(ours("a photo of ", "exact"), without, "exact mask, prompt with its space")
  for mode in losses.PROMPT_MASKS:  # without the space both masks are LAVIS's caption setting
    assert_close(ours("a photo of", mode), without, f"{mode} mask, prompt without a space")
  assert abs(with_space - without) > 100 * bound(without)
  with pytest.raises(ValueError, match="prompt_mask"):
    losses.build_stage2_batch(tok, CAPTIONS, "opt", prompt="a photo of", prompt_mask="LAVIS")


def test_build_stage2_batch(tmp_path):
  opt_tok = tiny.tiny_tokenizer("opt")
  seen = []

  class Recorder:  # records the strings LAVIS would tokenize
    pad_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens=True):
      texts = [texts] if isinstance(texts, str) else texts
      seen.extend(texts)
      return opt_tok(texts, add_special_tokens=add_special_tokens)
  b = losses.build_stage2_batch(Recorder(), ["a cat", "two big dogs"], "opt", prompt="a photo of ")
  assert seen[:2] == ["a photo of a cat\n", "a photo of two big dogs\n"]
  # the generation-time form of the prompt (no trailing space) gives the same batch (a word-level
  # tokenizer has no token for the space; byte-level BPE: test_stage2_prompt_mask_matches_lavis)
  b2 = losses.build_stage2_batch(Recorder(), ["a cat", "two big dogs"], "opt", prompt="a photo of")
  assert seen[-3:-1] == ["a photo of a cat\n", "a photo of two big dogs\n"]
  assert all((b[k] == b2[k]).all() for k in b)
  bos = opt_tok.bos_token_id
  assert b["input_ids"][0, 0] == bos and b["attention_mask"].tolist() == [[1] * 6 + [0], [1] * 7]
  # prompt (incl. BOS: 4 tokens) and padding carry no loss
  assert b["labels"][:, :4].tolist() == [[-100] * 4] * 2 and b["labels"][0, 6] == -100
  assert b["labels"][1, 4:].tolist() == b["input_ids"][1, 4:].tolist()
  # no prompt: LAVIS masks only padding, so BOS is a target
  b = losses.build_stage2_batch(opt_tok, ["a cat"], "opt", max_len=2)
  assert b["labels"].tolist() == [[bos, opt_tok.convert_tokens_to_ids("a")]]
  # llama: EOS appended
  ll = tiny.tiny_tokenizer("llama")
  b = losses.build_stage2_batch(ll, ["a cat"], "llama")
  assert b["input_ids"].tolist() == [[ll.bos_token_id] + ll.convert_tokens_to_ids(["a", "cat"]) + [ll.eos_token_id]]
  # t5 prefix-LM split at a word boundary
  assert losses.split_caption("a b c d e", 0.4) == ("a b", "c d e")
  assert losses.split_caption("a b", 0.0) == ("a", "b") and losses.split_caption("a", 0.5) == ("", "a")
  r = np.random.default_rng(0)
  ks = {len(losses.split_caption("a b c d e", None, r)[0].split()) for _ in range(200)}
  assert ks == {1, 2, 3, 4}
  t5tok = tiny.tiny_tokenizer("t5")
  b = losses.build_stage2_batch(t5tok, ["a cat on the grass", "two dog"], "t5", prefix_ratio=0.4)
  dec = t5tok.batch_decode(np.where(b["labels"] < 0, 0, b["labels"]), skip_special_tokens=True)
  enc = t5tok.batch_decode(b["input_ids"], skip_special_tokens=True)
  assert enc == ["a cat", "two"] and dec == ["on the grass", "dog"]
  assert b["labels"][1].tolist()[-2:] == [-100, -100] and b["decoder_attention_mask"][1].tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("n, b", [(4, 3), (8, 2), (3, 5)])
def test_exchange_plan_delivers_exactly_the_rows_asked_for(n, b):
  """The ragged all-to-all of the per-device stage-1 loss (TPU), simulated: every device sends the
  rows others asked of it into their buffers at the plan's offsets; each then reads back its own
  requests in order. Random requests, and all devices asking for rows of one device."""
  rng = np.random.default_rng(n)
  for trial in range(10):
    x = rng.standard_normal((n * b, 2))
    wanted = rng.integers(0, n * b, (n, b))
    if trial % 2:
      wanted[:] = rng.integers(0, b)
    plans = [jax.tree.map(np.asarray, losses.exchange_plan(wanted, me, b)) for me in range(n)]
    received = [np.full((b, 2), np.nan) for _ in range(n)]
    for s, p in enumerate(plans):
      operand = x[s * b:(s + 1) * b][p["send_rows"]]
      for d in range(n):
        k, start = p["send_sizes"][d], p["output_offsets"][d]
        assert k == plans[d]["recv_sizes"][s]
        received[d][start:start + k] = operand[p["input_offsets"][d]:p["input_offsets"][d] + k]
    for d in range(n):
      np.testing.assert_array_equal(received[d][plans[d]["back"]], x[wanted[d]])
