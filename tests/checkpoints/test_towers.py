"""Composite initialisation from separate towers (blip2_jax.checkpoints.towers) on tiny random HF towers.

Measured max abs diffs (CPU, float32, jax 0.10.2 vs torch 2.13 eager):
  vision tower vs HF Blip2 vision_model: 1.2e-6 (values up to 4.2)
  LLM tower logits vs the HF LLM: OPT 1.2e-6, T5 tied 1.8e-6 / untied 1.8e-6, LLaMA 2.1e-6 (values ~3);
  Qwen2 1.5e-6, Qwen3 2.3e-6, Mistral 2.1e-6, Gemma 2 1.5e-6, Gemma 3 1.8e-6 (values up to 3.6); a Gemma 3
  composite's text model 1.9e-6 (up to 4.5)
  Q-Former text path vs BERT (token_type_embeddings zeroed, as LAVIS drops them): 1.2e-6 (up to 3.5)
  Q-Former LM head vs BERT cls.predictions: 8.9e-8 (up to 1.0)
  saved composites reloaded by transformers (parity.compare, OPT / untied T5): vision 1.2e-6,
  qformer 9.5e-7, projection 8.9e-8, logits 1.3e-6 / 1.8e-6; Qwen2 / Qwen3 / Mistral /
  Gemma 2 / Gemma 3 logits 2.4e-6 / 1.3e-6 / 3.3e-6 / 1.4e-6 / 1.5e-6 (vision 2.2e-6, qformer 7.7e-7)
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

import blip2_jax
from blip2_jax.checkpoints import io, parity, tiny, towers
from blip2_jax.core import sharding
from blip2_jax.models import blip2
from blip2_jax.models import qformer as Q

from bounds import REL, assert_close

BERT_VOCAB = 98
NEW_FAMILIES = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3")
LM_CLASSES = {"opt": "OPTForCausalLM", "t5": "T5ForConditionalGeneration", "llama": "LlamaForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
              "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("towers")
  out = {"vision": tiny.save_tiny(str(root / "blip2"), "Blip2ForConditionalGeneration", "opt", seed=1)}
  torch.manual_seed(0)
  bert = T.BertForPreTraining(T.BertConfig(
      hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
      vocab_size=BERT_VOCAB, max_position_embeddings=64, attn_implementation="eager")).eval()
  tiny.perturb_(bert, seed=2)
  bert.save_pretrained(root / "bert")
  out["bert"] = str(root / "bert")
  for name, family, kw in [("opt", "opt", {}), ("t5", "t5", {}), ("llama", "llama", {}),
                           ("t5_untied", "t5", dict(tie_word_embeddings=False))] + [
                              (f, f, {}) for f in NEW_FAMILIES]:
    torch.manual_seed(3)
    m = getattr(T, LM_CLASSES[family])(tiny.tiny_text_config(family, attn_implementation="eager", **kw)).eval()
    if name == "t5_untied":  # HF 5 ties whatever the config says unless the head is distinct
      m.lm_head.weight = torch.nn.Parameter(torch.randn(tiny.VOCAB, 40) * 40 ** -0.5)
    tiny.perturb_(m, seed=4)
    m.save_pretrained(root / name)
    out[name] = str(root / name)
  return out


def _hf_vision(d):
  return T.Blip2ForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval().vision_model


def _std(x):
  return float(np.std(np.asarray(x)))


def _check_fresh(x, std=0.02):
  x = np.asarray(x)
  assert np.any(x != 0) and 0.6 * std < x.std() < 1.4 * std, x.std()


def _check_vision(model, params, vision_dir):
  rng = np.random.default_rng(0)
  px = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    ref = _hf_vision(vision_dir)(torch.from_numpy(px).permute(0, 3, 1, 2)).last_hidden_state.numpy()
  out = model.apply({"params": params}, jnp.asarray(px), method=lambda m, x: m.vision_model(x))
  assert_close(out["last_hidden_state"], ref, "vision")


def _check_hf_reload(model, params, tmp_path, cls, compare=True):
  """save_pretrained -> transformers loads it with no missing/unexpected keys -> same outputs."""
  blip2_jax.save_pretrained(model, params, str(tmp_path))
  _, info = getattr(T, cls).from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  if not compare:  # keeps the file under a minute; the retrieval heads are covered in test_blip2
    return
  rows = parity.compare(str(tmp_path), batch=2)
  assert all(r[1] <= REL * max(1.0, r[3]) for r in rows), rows  # tests/bounds.py


def _bert_sd(d):
  return {k: v.numpy() for k, v in T.BertForPreTraining.from_pretrained(d).state_dict().items()}


@pytest.mark.parametrize("family", ["opt", "t5", "llama", "t5_untied", *NEW_FAMILIES])
def test_generative_from_towers(dirs, tmp_path, family):
  cfg = towers.config_from_towers(dirs["vision"], dirs["bert"], dirs[family], num_query_tokens=4,
                                  image_token_index=tiny.VOCAB - 1)
  assert cfg.architecture == "Blip2ForConditionalGeneration" and cfg.family == family.split("_")[0]
  assert cfg.qformer.vocab_size == BERT_VOCAB + 1 and not cfg.qformer.use_qformer_text_input
  assert cfg.qformer.encoder_hidden_size == cfg.vision.hidden_size == 44
  if family.startswith("t5"):
    assert cfg.text.tie_word_embeddings == (family == "t5")
  model, params, rep = towers.init_from_towers(cfg, vision=dirs["vision"], qformer_bert=dirs["bert"],
                                               language_model=dirs[family], seed=0)
  _check_vision(model, params, dirs["vision"])

  # LLM tower: our composite's language_model == the HF LLM on the same ids
  rng = np.random.default_rng(1)
  ids = rng.integers(3, tiny.VOCAB - 1, (2, 7))
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  hf = getattr(T, LM_CLASSES[cfg.family]).from_pretrained(dirs[family], attn_implementation="eager").eval()
  v = {"params": params}
  with torch.no_grad():
    if cfg.family == "t5":
      dec = rng.integers(3, tiny.VOCAB - 1, (2, 4))
      ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
               decoder_input_ids=torch.from_numpy(dec)).logits.numpy()
      out = model.apply(v, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec),
                        method=lambda m, i, a, d: m.language_model(i, a, d))["logits"]
    else:
      ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
      out = model.apply(v, jnp.asarray(ids), jnp.asarray(mask),
                        method=lambda m, i, a: m.language_model(i, a))["logits"]
      keep = mask.astype(bool)
      ref, out = ref[keep], np.asarray(out)[keep]
  assert_close(out, ref, "LLM logits")

  # Q-Former: self-attention and query FFN copied from BERT; cross-attention fresh
  bert = _bert_sd(dirs["bert"])
  layer0 = params["qformer"]["encoder"]["layers_0"]["layer_0"]
  np.testing.assert_array_equal(layer0["intermediate_query"]["dense"]["kernel"],
                                bert["bert.encoder.layer.0.intermediate.dense.weight"].T)
  np.testing.assert_array_equal(layer0["attention"]["attention"]["query"]["kernel"],
                                bert["bert.encoder.layer.0.attention.self.query.weight"].T)
  assert "intermediate" not in layer0  # stage 2 drops the text FFN, as LAVIS
  _check_fresh(layer0["crossattention"]["attention"]["key"]["kernel"])
  np.testing.assert_array_equal(layer0["crossattention"]["attention"]["key"]["bias"], 0)
  _check_fresh(params["query_tokens"])
  _check_fresh(params["language_projection"]["kernel"])
  np.testing.assert_array_equal(params["language_projection"]["bias"], 0)
  assert rep["qformer_lm_head"] is None
  assert any("embeddings.word_embeddings.weight (the composite has no text" in u for u in rep["unused"])
  assert any(s.startswith("language_projection.weight") for s in rep["initialised"])
  assert any(s.startswith("query_tokens") for s in rep["initialised"])
  assert any(dirs[family] in s for s in rep["copied"])
  if family in ("opt", "t5_untied", *NEW_FAMILIES):  # transformers' Blip2 builds any causal LM
    _check_hf_reload(model, params, tmp_path, "Blip2ForConditionalGeneration")


def test_retrieval_from_towers(dirs, tmp_path):
  cfg = towers.config_from_towers(dirs["vision"], dirs["bert"], num_query_tokens=4,
                                  image_text_hidden_size=24)
  assert cfg.architecture == "Blip2ForImageTextRetrieval" and cfg.qformer.use_qformer_text_input
  model, params, rep = towers.init_from_towers(cfg, vision=dirs["vision"], qformer_bert=dirs["bert"],
                                               seed=0)
  _check_vision(model, params, dirs["vision"])
  torch_bert = T.BertForPreTraining.from_pretrained(dirs["bert"], attn_implementation="eager").eval()
  bert = {k: v.detach().numpy() for k, v in torch_bert.state_dict().items()}

  # embeddings: BERT rows + one fresh [DEC] row
  word = np.asarray(params["embeddings"]["word_embeddings"]["embedding"])
  assert word.shape == (BERT_VOCAB + 1, 32)
  np.testing.assert_array_equal(word[:BERT_VOCAB], bert["bert.embeddings.word_embeddings.weight"])
  assert np.any(word[BERT_VOCAB] != 0) and 0.005 < word[BERT_VOCAB].std() < 0.04

  # query FFN == text FFN in every layer; cross-attention and heads fresh
  for g, group in params["qformer"]["encoder"].items():
    for j, layer in group.items():
      for a, b in (("intermediate", "intermediate_query"), ("output", "output_query")):
        for x, y in zip(jax.tree.leaves(layer[a]), jax.tree.leaves(layer[b])):
          np.testing.assert_array_equal(x, y)
      if j == "layer_0":
        _check_fresh(layer["crossattention"]["attention"]["value"]["kernel"])
        np.testing.assert_array_equal(layer["crossattention"]["output"]["LayerNorm"]["scale"], 1)
  for k in ("vision_projection", "text_projection", "itm_head"):
    _check_fresh(params[k]["kernel"])
    np.testing.assert_array_equal(params[k]["bias"], 0)
  _check_fresh(params["query_tokens"])

  # text path == BERT with token_type_embeddings zeroed (LAVIS drops them)
  ids = np.array([[2, 17, 40, 61, 8, 3], [2, 90, 5, 3, 0, 0]])
  tmask = (ids != 0).astype(np.int64)
  with torch.no_grad():
    torch_bert.bert.embeddings.token_type_embeddings.weight.zero_()
    ref = torch_bert.bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(tmask))
    ref_h = ref.last_hidden_state.numpy()
    ref_logits = torch_bert.cls(ref.last_hidden_state, ref.pooler_output)[0].numpy()
  out, _ = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(tmask),
                       method=lambda m, i, a: m.text_features(i, a))
  h = np.asarray(out["last_hidden_state"])
  assert_close(h, ref_h, "Q-Former text path")

  # the ITG head comes back next to the composite, tied to the grown embedding table
  head = rep["qformer_lm_head"]
  assert head is not None and head["bias"].shape == (BERT_VOCAB + 1,)
  logits = Q.QFormerLMHead(cfg.qformer).apply({"params": head}, jnp.asarray(ref_h), jnp.asarray(word))
  assert_close(np.asarray(logits)[..., :BERT_VOCAB], ref_logits)
  assert any(s.startswith("qformer_lm_head: cls.predictions.transform.dense.weight") for s in rep["copied"])
  _check_hf_reload(model, params, tmp_path, "Blip2ForImageTextRetrieval", compare=False)


def test_fresh_towers_and_mesh(dirs):
  """Towers not given are initialised; with a mesh every leaf lands in its sharding, same values."""
  cfg = towers.config_from_towers(dirs["vision"], dirs["bert"], dirs["opt"], num_query_tokens=4)
  ref_model, ref, _ = towers.init_from_towers(cfg, vision=dirs["vision"], qformer_bert=dirs["bert"],
                                              language_model=dirs["opt"], seed=5)
  mesh = sharding.make_mesh((2, 2, 2))
  _, params, _ = towers.init_from_towers(cfg, vision=dirs["vision"], qformer_bert=dirs["bert"],
                                         language_model=dirs["opt"], seed=5, mesh=mesh)
  want = io.flatten(sharding.param_shardings(io.abstract_params(ref_model, **blip2.dummy_inputs(cfg)),
                                       mesh, sharding.DEFAULT_RULES))
  got, r = io.flatten(params), io.flatten(ref)
  assert got.keys() == r.keys() == want.keys()
  for k, v in got.items():
    assert v.sharding.is_equivalent_to(want[k], v.ndim), k
    np.testing.assert_array_equal(np.asarray(v), np.asarray(r[k]), err_msg=k)
  assert any(s.sharding.spec != jax.sharding.PartitionSpec() for s in got.values() if s.ndim)
  # only the LLM given: vision + Q-Former fresh, reported as such
  _, p2, rep = towers.init_from_towers(cfg, language_model=dirs["opt"], seed=1)
  assert any(s.startswith("vision_model.* (") for s in rep["initialised"])
  assert any(s.startswith("qformer.* (") for s in rep["initialised"])
  for x, y in zip(jax.tree.leaves(p2["language_model"]), jax.tree.leaves(ref["language_model"])):
    np.testing.assert_array_equal(x, y)
  _check_fresh(p2["qformer"]["encoder"]["layers_0"]["layer_0"]["crossattention"]["attention"]["query"]["kernel"])


def test_errors(dirs):
  cfg = towers.config_from_towers(dirs["vision"], dirs["bert"], dirs["opt"], num_query_tokens=4)
  bad = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, intermediate_size=96))
  with pytest.raises(io.CheckpointError, match=r"config\.vision(.|\n)*encoder\.layers\.0\.mlp\.fc1\.weight"):
    towers.init_from_towers(bad, vision=dirs["vision"])
  with pytest.raises(io.CheckpointError, match="expected a BLIP-2"):
    towers.config_from_towers(dirs["bert"], dirs["bert"], dirs["opt"])
  with pytest.raises(io.CheckpointError, match="'opt' checkpoint"):
    towers.config_from_towers(dirs["vision"], dirs["opt"])
  with pytest.raises(ValueError, match="needs a language model"):
    towers.config_from_towers(dirs["vision"], dirs["bert"], architecture="Blip2ForConditionalGeneration")
  t5cfg = towers.config_from_towers(dirs["vision"], dirs["bert"], dirs["t5"], num_query_tokens=4)
  with pytest.raises(io.CheckpointError, match="lm_head"):
    towers.init_from_towers(t5cfg, language_model=dirs["t5_untied"])
  with pytest.raises(io.CheckpointError, match="language_model tower"):
    towers.init_from_towers(cfg, language_model=dirs["llama"])


def test_gemma3_composite_as_llm_tower(dirs, tmp_path):
  """A Gemma 3 composite directory (Gemma3ForConditionalGeneration): its text config and its
  `language_model.model.*` weights make the LLM; the SigLIP tower and projector are left out.
  No final soft-cap (as the released Gemma 3): Gemma3ForConditionalGeneration's head never applies
  one, Gemma3ForCausalLM (what BLIP-2 runs, and we) does."""
  text = tiny.tiny_text_config("gemma3", attn_implementation="eager", final_logit_softcapping=None)
  vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, image_size=28, patch_size=14)
  torch.manual_seed(6)
  hf = T.Gemma3ForConditionalGeneration(T.Gemma3Config(
      text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
      image_token_index=tiny.VOCAB - 1, boi_token_index=tiny.VOCAB - 2, eoi_token_index=tiny.VOCAB - 3)).eval()
  tiny.perturb_(hf, seed=7)
  hf.save_pretrained(tmp_path)
  cfg = towers.config_from_towers(dirs["vision"], dirs["bert"], str(tmp_path), num_query_tokens=4)
  assert cfg.family == "gemma3" and cfg.text.windows == (5, None)
  model, params, rep = towers.init_from_towers(cfg, language_model=str(tmp_path))
  ids = np.random.default_rng(2).integers(3, tiny.VOCAB - 4, (2, 7))
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
  out = model.apply({"params": params}, jnp.asarray(ids), method=lambda m, i: m.language_model(i))["logits"]
  assert_close(out, ref, "Gemma 3 composite's LLM logits")  # measured 1.9e-6 (values up to 4.5)
