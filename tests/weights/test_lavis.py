"""LAVIS `.pth` loading (blip2_jax.weights.lavis) against transformers on tiny random models.

The LAVIS-named state dicts are written HERE from a tiny HF model with a mapping taken from the
LAVIS 1.0.2 source (models/eva_vit.py, blip2_models/{Qformer,blip2,blip2_qformer,blip2_opt}.py),
independent of lavis.RENAMES:
  EVA VisionTransformer: cls_token, pos_embed, patch_embed.proj, blocks.{i}.{norm1, attn.qkv
  (no bias), attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1, mlp.fc2}; Blip2Base.ln_vision;
  Qformer = BertLMHeadModel: bert.embeddings.{word_embeddings, position_embeddings, LayerNorm,
  position_ids buffer}, bert.encoder.layer.{i}.{attention.self.{query,key,value},
  attention.output, crossattention.*, intermediate(_query), output(_query)}, cls.predictions.*;
  Blip2Qformer: query_tokens, vision_proj, text_proj, itm_head, temp; Blip2OPT: opt_proj, and
  Qformer.cls / word+position embeddings set to None.
HF's tiny ViT has a non-zero k part in its fused qkv bias; LAVIS has none (zero), which changes
nothing in softmax, so the outputs must still agree.

Measured max abs diffs (float32, CPU, values of order 1-4): stage 1 retrieval: vision 2.2e-6
(scanned 2.3e-6), ITC 7.5e-8, ITM 3.7e-8, image/text embeds 8.9e-8 / 6.0e-8; stage 2 OPT:
vision 2.2e-6, qformer 1.2e-6, projection 1.2e-7, logits 1.1e-6.
"""
import jax
import numpy as np
import pytest
import torch
import transformers as T

from blip2_jax import parity, testing
from blip2_jax.models import blip2
from blip2_jax.weights import hf as hf_io
from blip2_jax.weights import io, lavis

TOL = 4e-6


def _vision_to_lavis(sd, vcfg):
  d, out = vcfg.hidden_size, {}
  v = "vision_model."
  out["visual_encoder.cls_token"] = sd[v + "embeddings.class_embedding"]
  out["visual_encoder.pos_embed"] = sd[v + "embeddings.position_embedding"]
  for w in ("weight", "bias"):
    out[f"visual_encoder.patch_embed.proj.{w}"] = sd[f"{v}embeddings.patch_embedding.{w}"]
    out[f"ln_vision.{w}"] = sd[f"{v}post_layernorm.{w}"]
  for i in range(vcfg.num_hidden_layers):
    h, b = f"{v}encoder.layers.{i}.", f"visual_encoder.blocks.{i}."
    for w in ("weight", "bias"):
      out[f"{b}norm1.{w}"] = sd[f"{h}layer_norm1.{w}"]
      out[f"{b}norm2.{w}"] = sd[f"{h}layer_norm2.{w}"]
      out[f"{b}attn.proj.{w}"] = sd[f"{h}self_attn.projection.{w}"]
      out[f"{b}mlp.fc1.{w}"] = sd[f"{h}mlp.fc1.{w}"]
      out[f"{b}mlp.fc2.{w}"] = sd[f"{h}mlp.fc2.{w}"]
    out[f"{b}attn.qkv.weight"] = sd[f"{h}self_attn.qkv.weight"]
    qkv_bias = sd[f"{h}self_attn.qkv.bias"]
    out[f"{b}attn.q_bias"] = qkv_bias[:d].clone()
    out[f"{b}attn.v_bias"] = qkv_bias[2 * d:].clone()  # the k part is dropped: EVA has none
  return out


def _qformer_to_lavis(sd, qcfg, text_ffn):
  out = {"Qformer.bert.embeddings.LayerNorm.weight": sd["qformer.layernorm.weight"],
         "Qformer.bert.embeddings.LayerNorm.bias": sd["qformer.layernorm.bias"]}
  for i in range(qcfg.num_hidden_layers):
    h, b = f"qformer.encoder.layer.{i}.", f"Qformer.bert.encoder.layer.{i}."
    atts = ("attention", "crossattention") if i % qcfg.cross_attention_frequency == 0 else ("attention",)
    for att in atts:
      for w in ("weight", "bias"):
        for p in ("query", "key", "value"):
          out[f"{b}{att}.self.{p}.{w}"] = sd[f"{h}{att}.attention.{p}.{w}"]
        out[f"{b}{att}.output.dense.{w}"] = sd[f"{h}{att}.output.dense.{w}"]
        out[f"{b}{att}.output.LayerNorm.{w}"] = sd[f"{h}{att}.output.LayerNorm.{w}"]
    for sfx in ("_query", "") if text_ffn else ("_query",):
      for w in ("weight", "bias"):
        out[f"{b}intermediate{sfx}.dense.{w}"] = sd[f"{h}intermediate{sfx}.dense.{w}"]
        out[f"{b}output{sfx}.dense.{w}"] = sd[f"{h}output{sfx}.dense.{w}"]
        out[f"{b}output{sfx}.LayerNorm.{w}"] = sd[f"{h}output{sfx}.LayerNorm.{w}"]
  return out


def _lm_head(qcfg, word):
  g = torch.Generator().manual_seed(7)
  d, v = qcfg.hidden_size, qcfg.vocab_size
  p = "Qformer.cls.predictions."
  return {p + "bias": torch.randn(v, generator=g), p + "decoder.bias": torch.randn(v, generator=g),
          p + "decoder.weight": word.clone(),  # tied to the word embeddings in BertLMHeadModel
          p + "transform.dense.weight": torch.randn(d, d, generator=g),
          p + "transform.dense.bias": torch.randn(d, generator=g),
          p + "transform.LayerNorm.weight": torch.randn(d, generator=g),
          p + "transform.LayerNorm.bias": torch.randn(d, generator=g)}


def _compare(hf, model, params, cfg):
  inp = parity.make_inputs(cfg, batch=2)
  ref = parity._hf_forward(hf, cfg, inp, torch)
  ours = parity._our_forward(model, params, cfg, inp)
  rows = {}
  for k in ref:
    a, b = parity._valid(k, ref[k], inp, cfg), parity._valid(k, ours[k], inp, cfg)
    rows[k] = float(np.abs(a - b).max())
  assert max(rows.values()) <= TOL, rows
  return rows


def _stage1(tmp_path):
  d = testing.save_tiny(str(tmp_path / "hf"), "Blip2ForImageTextRetrieval")
  hf = T.Blip2ForImageTextRetrieval.from_pretrained(d, attn_implementation="eager").eval()
  cfg = blip2.Blip2Config.from_hf(hf.config)
  sd = hf.state_dict()
  word = sd["embeddings.word_embeddings.weight"]
  lv = {**_vision_to_lavis(sd, cfg.vision), **_qformer_to_lavis(sd, cfg.qformer, text_ffn=True),
        "Qformer.bert.embeddings.word_embeddings.weight": word,
        "Qformer.bert.embeddings.position_embeddings.weight": sd["embeddings.position_embeddings.weight"],
        "Qformer.bert.embeddings.position_ids": torch.arange(cfg.qformer.max_position_embeddings)[None],
        "query_tokens": sd["query_tokens"], "temp": torch.tensor(0.07),
        **_lm_head(cfg.qformer, word)}
  for hf_name, lv_name in (("vision_projection", "vision_proj"), ("text_projection", "text_proj"),
                           ("itm_head", "itm_head")):
    for w in ("weight", "bias"):
      lv[f"{lv_name}.{w}"] = sd[f"{hf_name}.{w}"]
  return hf, cfg, lv


def test_stage1_retrieval(tmp_path):
  hf, cfg, lv = _stage1(tmp_path)
  pth = str(tmp_path / "blip2_pretrained.pth")
  torch.save({"model": lv}, pth)  # LAVIS checkpoints wrap the state dict in {"model": ...}
  model, params, extras = lavis.load_lavis(pth, cfg)
  # the fused bias: [q, 0, v] (HF's k part is gone, outputs unchanged)
  b = np.asarray(params["vision_model"]["encoder"]["layers_0"]["self_attn"]["qkv"]["bias"])
  d = cfg.vision.hidden_size
  np.testing.assert_array_equal(b[d:2 * d], 0)
  np.testing.assert_array_equal(b[:d], lv["visual_encoder.blocks.0.attn.q_bias"].numpy())
  np.testing.assert_array_equal(b[2 * d:], lv["visual_encoder.blocks.0.attn.v_bias"].numpy())
  rows = _compare(hf, model, params, cfg)
  assert {"vision", "itc_logits_per_image", "itm_logits_per_image", "text_embeds"} <= set(rows)
  assert set(extras) == {"temp"} | {k for k in lv if k.startswith("Qformer.cls.predictions.")}
  np.testing.assert_allclose(extras["temp"], 0.07, rtol=1e-7)
  # the LM head + temp for stage-1 captioning / training, and their file beside the HF directory
  head, temp = lavis.qformer_head_params(extras, model)
  p = "Qformer.cls.predictions."
  np.testing.assert_array_equal(head["bias"], lv[p + "bias"].numpy())
  np.testing.assert_array_equal(head["transform"]["dense"]["kernel"], lv[p + "transform.dense.weight"].numpy().T)
  hf_io.save_qformer_head(str(tmp_path / "hf"), model, head, temp)
  head2, temp2 = hf_io.load_qformer_head(str(tmp_path / "hf"), model)
  for a, b in zip(jax.tree.leaves(head), jax.tree.leaves(head2)):
    np.testing.assert_array_equal(a, b)
  assert float(temp2) == pytest.approx(0.07)
  T.Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path / "hf"))  # HF ignores the extra file
  # scanned load gives the same outputs
  cfg_s = cfg.replace_runtime(scan=True)
  model_s, params_s, _ = lavis.load_lavis(pth, cfg_s)
  assert "layers" in params_s["vision_model"]["encoder"]
  _compare(hf, model_s, params_s, cfg_s)


def test_stage2_opt(tmp_path):
  d = testing.save_tiny(str(tmp_path / "hf"), "Blip2ForConditionalGeneration", "opt")
  hf = T.Blip2ForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
  cfg = blip2.Blip2Config.from_hf(hf.config)
  assert not cfg.qformer.use_qformer_text_input
  sd = hf.state_dict()
  lv = {**_vision_to_lavis(sd, cfg.vision), **_qformer_to_lavis(sd, cfg.qformer, text_ffn=False),
        "query_tokens": sd["query_tokens"],
        "opt_proj.weight": sd["language_projection.weight"], "opt_proj.bias": sd["language_projection.bias"]}
  # Blip2OPT keeps the stage-1 text FFN weights in its Q-Former (unused; no word/position
  # embeddings, no cls head): they must be accepted and left out.
  g = torch.Generator().manual_seed(3)
  q = cfg.qformer
  for i in range(q.num_hidden_layers):
    b = f"Qformer.bert.encoder.layer.{i}."
    lv[b + "intermediate.dense.weight"] = torch.randn(q.intermediate_size, q.hidden_size, generator=g)
    lv[b + "intermediate.dense.bias"] = torch.randn(q.intermediate_size, generator=g)
    lv[b + "output.dense.weight"] = torch.randn(q.hidden_size, q.intermediate_size, generator=g)
    for w in ("dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
      lv[b + "output." + w] = torch.randn(q.hidden_size, generator=g)
  pth = str(tmp_path / "blip2_pretrained_opt.pth")
  torch.save({"model": lv}, pth)
  llm_dir = str(tmp_path / "opt")
  hf.language_model.save_pretrained(llm_dir)
  with pytest.raises(ValueError, match="llm_dir"):
    lavis.load_lavis(pth, cfg)
  model, params, extras = lavis.load_lavis(pth, cfg, llm_dir=llm_dir)
  assert extras == {}
  assert "intermediate" not in params["qformer"]["encoder"]["layers_0"]["layer_0"]
  rows = _compare(hf, model, params, cfg)
  assert {"vision", "qformer", "projection", "logits"} <= set(rows)


def test_not_lavis(tmp_path):
  bert = {"bert.embeddings.word_embeddings.weight": torch.zeros(5, 4),
          "cls.predictions.bias": torch.zeros(5)}
  pth = str(tmp_path / "bert.pth")
  torch.save(bert, pth)
  cfg = blip2.Blip2Config.from_hf(testing.tiny_blip2_config(None), architecture="Blip2ForImageTextRetrieval")
  with pytest.raises(io.CheckpointError, match="not a LAVIS BLIP-2 checkpoint"):
    lavis.load_lavis(pth, cfg)
  torch.save({"model": [1, 2]}, pth)
  with pytest.raises(io.CheckpointError, match="not a state dict|not a LAVIS"):
    lavis.load_lavis(pth, cfg)
  # LAVIS-like, but with a tensor no LAVIS BLIP-2 has and a q_bias without its v_bias
  odd = {"query_tokens": torch.zeros(1, 4, 32), "Qformer.bert.embeddings.LayerNorm.weight": torch.ones(32),
         "visual_encoder.blocks.0.attn.q_bias": torch.zeros(44), "Qformer.bert.pooler.dense.weight": torch.zeros(2)}
  torch.save(odd, pth)
  with pytest.raises(io.CheckpointError, match=r"pooler\.dense\.weight(.|\n)*q_bias \(without its v_bias\)"):
    lavis.load_lavis(pth, cfg)
  # a missing tensor is named (strict loading behind the renames)
  _, cfg1, lv = _stage1(tmp_path)
  del lv["visual_encoder.blocks.1.mlp.fc2.weight"]
  torch.save({"model": lv}, pth)
  with pytest.raises(io.CheckpointError, match=r"vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight"):
    lavis.load_lavis(pth, cfg1)
