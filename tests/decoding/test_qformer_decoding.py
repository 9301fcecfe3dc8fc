"""Stage-1 Q-Former captioning (ITG head) against transformers `generate` on a torch twin.

No HF class captions with the Q-Former, so the reference is a small torch `GenerationMixin`
model built from HF's Blip2ForImageTextRetrieval modules (embeddings, qformer, vision_model)
plus a BERT `cls.predictions` head tied to the word embeddings, run as LAVIS does: the whole
[queries; text] sequence under the UniLM mask at every step (no cache).
"""
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_outputs import CausalLMOutput

import blip2_jax
from blip2_jax.checkpoints import hf as hf_io
from blip2_jax.checkpoints import io, tiny
from blip2_jax.decoding import qformer as QD

from bounds import assert_close
from helpers import count_traces

DEC, SEP, PAD = 98, 3, 0  # tiny.tiny_tokenizer("bert") ids


def _itg_mask(q_len, b, t):
  """LAVIS get_extended_attention_mask (is_decoder, has_query) for an all-valid text."""
  seq = torch.arange(t)
  causal = (seq[None, :] <= seq[:, None]).float()
  causal = torch.cat([torch.zeros(q_len, t), causal], dim=0)
  causal = torch.cat([torch.ones(q_len + t, q_len), causal], dim=1)
  return causal[None].expand(b, -1, -1)


class Head(torch.nn.Module):
  """BERT BertLMPredictionHead with the decoder tied to the Q-Former word embeddings."""

  def __init__(self, qcfg, table):
    super().__init__()
    self.dense = torch.nn.Linear(qcfg.hidden_size, qcfg.hidden_size)
    self.act = transformers.activations.ACT2FN[qcfg.hidden_act]
    self.norm = torch.nn.LayerNorm(qcfg.hidden_size, eps=qcfg.layer_norm_eps)
    self.bias = torch.nn.Parameter(torch.zeros(qcfg.vocab_size))
    self.table = table

  def forward(self, h):
    return torch.nn.functional.linear(self.norm(self.act(self.dense(h))), self.table, self.bias)


class TorchCaptioner(transformers.PreTrainedModel, transformers.GenerationMixin):
  config_class = transformers.Blip2Config

  def __init__(self, hf, head):
    super().__init__(hf.config)
    self.hf, self.head = hf, head

  def forward(self, input_ids, image_embeds=None, **kwargs):
    b, t = input_ids.shape
    q = self.hf.query_tokens.expand(b, -1, -1)
    ql = q.shape[1]
    emb = self.hf.embeddings(input_ids=input_ids, query_embeds=q)
    mask = (1.0 - _itg_mask(ql, b, t)[:, None]) * torch.finfo(torch.float32).min
    out = self.hf.qformer(query_embeds=emb, query_length=ql, attention_mask=mask,
                          encoder_hidden_states=image_embeds)
    return CausalLMOutput(logits=self.head(out.last_hidden_state[:, ql:]))

  def prepare_inputs_for_generation(self, input_ids, **kwargs):
    return {"input_ids": input_ids, "image_embeds": kwargs["image_embeds"]}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  d = tiny.save_tiny(str(tmp_path_factory.mktemp("stage1")), "Blip2ForImageTextRetrieval")
  hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(d, attn_implementation="eager").eval()
  qcfg = hf.config.qformer_config
  torch.manual_seed(1)
  head = Head(qcfg, hf.embeddings.word_embeddings.weight)
  with torch.no_grad():
    # At init the tiny Q-Former's text barely depends on the image (cross-attention weights ~0.02)
    # and the tied logits span ~1, so every image would get the same caption. Strengthen the
    # image -> queries -> text path and sharpen the head so captions differ per image and rows
    # stop at different steps.
    for n, p in hf.qformer.named_parameters():
      if n.endswith("weight") and "LayerNorm" not in n:
        if "crossattention" in n:
          p.mul_(10.0)
        elif ".attention.value." in n or ".attention.output.dense." in n:
          p.mul_(5.0)
    for p in (head.dense.weight, head.dense.bias, head.norm.weight, head.norm.bias, head.bias):
      p.add_(torch.randn_like(p) * 0.3)
    head.norm.weight.mul_(20.0)
    head.bias[SEP] += 3.0
  hf.save_pretrained(d)
  sd = {f"cls.predictions.{k}": v.detach().numpy() for k, v in
        (("transform.dense.weight", head.dense.weight), ("transform.dense.bias", head.dense.bias),
         ("transform.LayerNorm.weight", head.norm.weight), ("transform.LayerNorm.bias", head.norm.bias),
         ("bias", head.bias))}
  io.write_safetensors(f"{d}/{hf_io.QFORMER_HEAD_NAME}", dict(sd, temp=np.float32(0.07)))
  model, params = blip2_jax.from_pretrained(d)
  lm_head, temp = hf_io.load_qformer_head(d, model)
  assert float(temp) == pytest.approx(0.07)
  ref = TorchCaptioner(hf, head).eval()
  px = np.random.default_rng(0).standard_normal((3, 28, 28, 3)).astype(np.float32)
  return d, model, params, lm_head, ref, px


def _hf_generate(ref, px, **kw):
  with torch.no_grad():
    embeds = ref.hf.vision_model(torch.from_numpy(px).permute(0, 3, 1, 2)).last_hidden_state
    ids = torch.full((px.shape[0], 1), DEC, dtype=torch.long)
    out = ref.generate(input_ids=ids, image_embeds=embeds, bos_token_id=DEC, eos_token_id=SEP,
                       pad_token_id=PAD, use_cache=False, **kw)
  return out[:, 1:].numpy()


def _assert_same(ours, ref):
  ours = np.asarray(ours)
  for o, r in zip(ours, ref):  # equal up to and including [SEP]; after it ours holds pad
    n = next((i + 1 for i, t in enumerate(r) if t == SEP), len(r))
    np.testing.assert_array_equal(o[:n], r[:n])
    assert (o[n:] == PAD).all()


def test_logits_match_torch(stage1):
  d, model, params, lm_head, ref, px = stage1
  ids = np.array([[DEC, 10, 11, 12]] * 3, np.int32)
  with torch.no_grad():
    embeds = ref.hf.vision_model(torch.from_numpy(px).permute(0, 3, 1, 2)).last_hidden_state
    want = ref(torch.from_numpy(ids).long(), embeds).logits.numpy()
  vis = model.apply({"params": params}, px, method="image_features")[0]["last_hidden_state"]
  got = QD.lm_logits(model, params, lm_head, vis, ids, np.ones_like(ids))
  assert_close(got, want)  # measured 2.4e-6 (logits up to 7)


@pytest.mark.parametrize("opts", [
    dict(num_beams=1, max_new_tokens=8),
    dict(num_beams=3, max_new_tokens=8, min_new_tokens=4),  # LAVIS's beam / min-length pair
    dict(num_beams=5, max_new_tokens=7, min_new_tokens=3, length_penalty=0.0, repetition_penalty=1.5),
    dict(num_beams=3, max_new_tokens=6, min_new_tokens=2, no_repeat_ngram_size=2, length_penalty=-1.0),
])
def test_generate_matches_hf(stage1, opts):
  d, model, params, lm_head, ref, px = stage1
  ours = QD.generate(model, params, lm_head, px, bos_token_id=DEC, eos_token_id=SEP, pad_token_id=PAD,
                     **dict(dict(min_new_tokens=0), **opts))
  hf_kw = dict(opts, do_sample=False)
  _assert_same(ours, _hf_generate(ref, px, **hf_kw))


def test_one_compile_and_sampling_reproducible(stage1):
  d, model, params, lm_head, ref, px = stage1
  import jax
  kw = dict(bos_token_id=DEC, eos_token_id=SEP, pad_token_id=PAD, num_beams=1, do_sample=True, top_p=0.9,
            max_new_tokens=6, min_new_tokens=0)
  a = QD.generate(model, params, lm_head, px, rng=jax.random.PRNGKey(3), **kw)
  misses = QD._generate_fn.cache_info().misses
  with count_traces() as traces:
    b = QD.generate(model, params, lm_head, px, rng=jax.random.PRNGKey(3), **kw)
  np.testing.assert_array_equal(a, b)
  assert QD._generate_fn.cache_info().misses == misses and traces == []


def test_errors(stage1, tmp_path):
  d, model, params, lm_head, ref, px = stage1
  with pytest.raises(ValueError, match="bos_token_id=500"):
    QD.generate(model, params, lm_head, px, bos_token_id=500, eos_token_id=SEP)
  with pytest.raises(FileNotFoundError, match="qformer_lm_head.safetensors"):
    hf_io.load_qformer_head(str(tmp_path), model)
  gen_dir = tiny.save_tiny(str(tmp_path / "opt"), "Blip2ForConditionalGeneration", "opt", tokenizer=False)
  gmodel, gparams = blip2_jax.from_pretrained(gen_dir)
  with pytest.raises(TypeError, match="Blip2ForImageTextRetrieval"):
    QD.generate(gmodel, gparams, lm_head, px, bos_token_id=DEC, eos_token_id=SEP)


def test_head_round_trip(stage1, tmp_path):
  d, model, params, lm_head, ref, px = stage1
  hf_io.save_qformer_head(str(tmp_path), model, lm_head, temp=0.05)
  back, temp = hf_io.load_qformer_head(str(tmp_path), model)
  import jax
  for x, y in zip(jax.tree.leaves(lm_head), jax.tree.leaves(back)):
    np.testing.assert_array_equal(x, y)
  assert float(temp) == pytest.approx(0.05)
