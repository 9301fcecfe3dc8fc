"""LAVIS `.pth` loading (blip2_jax.checkpoints.lavis) against transformers on tiny random models.

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
Files as LAVIS's runner writes them (runner_base._save_checkpoint) leave out the frozen ViT; the ViT
then comes from an eva_vit_g.pth-layout file (the `visual_encoder.*` keys without the prefix) or an
HF directory. The torch references compute LAVIS's `ln_vision` with its eps, 1e-5.
HF's tiny ViT has a non-zero k part in its fused qkv bias; LAVIS has none (zero), which changes
nothing in softmax, so the outputs must still agree.

Measured max abs diffs (float32, CPU, values of order 1-4; bound 1e-5 x max(1, |reference|),
tests/bounds.py), ln_vision eps 1e-5 on both sides: stage 1 retrieval: vision 2.9e-6 (scanned
2.1e-6), ITC 3.0e-8, ITM 3.0e-8, image/text embeds 1.2e-7 / 6.0e-8; stage 2 OPT (ViT from the HF
directory): vision 3.6e-6, qformer 6.0e-7, projection 1.2e-7, logits 9.5e-7. Stage-1 losses against
LAVIS's Blip2Qformer.forward formulas (torch_ref): see test_stage1_losses_match_lavis.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T

import blip2_jax
from blip2_jax.checkpoints import hf as hf_io
from blip2_jax.checkpoints import io, lavis, parity, tiny
from blip2_jax.models import blip2
from blip2_jax.train import losses

import torch_ref
from bounds import assert_close, bound


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
  """Our forward against `hf`'s, whose post_layernorm computes with LAVIS's ln_vision eps."""
  hf.vision_model.post_layernorm.eps = lavis.LN_VISION_EPS
  inp = parity.make_inputs(cfg, batch=2)
  ref = parity._hf_forward(hf, cfg, inp, torch)
  ours = parity._our_forward(model, params, cfg, inp)
  rows = {}
  for k in ref:
    a, b = parity._valid(k, ref[k], inp, cfg), parity._valid(k, ours[k], inp, cfg)
    rows[k] = assert_close(b, a, k)
  return rows


def _lavis_like_(hf, vit_scale=5e-4, seed=0):
  """Makes the tiny model's stage-1 losses depend on the image and on ln_vision's eps.

  Q-Former, projections and ITM head get fan-in scaled weights and the text / query embeddings
  unit ones (the tiny defaults leave features dominated by biases, the same for every image);
  the ViT's residual stream (embeddings and each block's output projections) is scaled by
  `vit_scale`, so the ViT output's variance (~2e-5) is comparable to the eps: 1e-5 or 1e-6 then
  moves ITC / ITM / ITG by 2e-3 to 2e-2 relative."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for mod in (hf.qformer, hf.vision_projection, hf.text_projection, hf.itm_head):
      for m in mod.modules():
        if isinstance(m, torch.nn.Linear):
          m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
    for p in (hf.embeddings.word_embeddings.weight, hf.query_tokens):
      p.copy_(torch.randn(p.shape, generator=g))
    for n, p in hf.vision_model.named_parameters():
      if n.startswith("embeddings.") or ".self_attn.projection." in n or ".mlp.fc2." in n:
        p.mul_(vit_scale)


def _runner_file(lv, path):
  """`lv` as LAVIS's runner saves it (runner_base._save_checkpoint): parameters without gradient
  (the frozen ViT) left out, the state dict under "model" beside the run's other state."""
  model = {k: v for k, v in lv.items() if not k.startswith("visual_encoder.")}
  torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
              "config": {"run": {"task": "image_text_pretrain"}}, "scaler": None, "epoch": 3}, path)
  return path


def _eva_file(lv, path):
  """The ViT of `lv` as eva_vit_g.pth holds it (no `visual_encoder.` prefix), with one block more
  than the model uses (EVA-CLIP-g has 40 blocks, BLIP-2 builds 39) and EVA's final norm."""
  pre = "visual_encoder."
  eva = {k[len(pre):]: v for k, v in lv.items() if k.startswith(pre)}
  last = max(int(k.split(".")[1]) for k in eva if k.startswith("blocks."))
  g = torch.Generator().manual_seed(5)
  eva.update({k.replace(f"blocks.{last}.", f"blocks.{last + 1}."): torch.randn(v.shape, generator=g)
              for k, v in list(eva.items()) if k.startswith(f"blocks.{last}.")})
  d = eva["cls_token"].shape[-1]
  eva.update({"norm.weight": torch.ones(d), "norm.bias": torch.zeros(d)})
  torch.save(eva, path)
  return path


def _stage1(tmp_path, lavis_like=False, **config_kw):
  d = tiny.save_tiny(str(tmp_path / "hf"), "Blip2ForImageTextRetrieval", **config_kw)
  hf = T.Blip2ForImageTextRetrieval.from_pretrained(d, attn_implementation="eager").eval()
  if lavis_like:
    _lavis_like_(hf)
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
  assert model.config.vision.post_eps == lavis.LN_VISION_EPS
  assert cfg.vision.post_layernorm_eps is None and "post_layernorm_eps" not in cfg.to_hf().vision_config.to_dict()
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
  _check_saved_eps(model, params, str(tmp_path / "saved"))
  # scanned load gives the same outputs
  cfg_s = cfg.replace_runtime(scan=True)
  model_s, params_s, _ = lavis.load_lavis(pth, cfg_s)
  assert "layers" in params_s["vision_model"]["encoder"]
  _compare(hf, model_s, params_s, cfg_s)


def _check_saved_eps(model, params, out):
  """save_pretrained keeps ln_vision's eps as an extra vision_config key that from_pretrained
  reads back; transformers still loads the directory."""
  with pytest.warns(UserWarning, match="post_layernorm_eps"):
    blip2_jax.save_pretrained(model, params, out)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["vision_config"]["post_layernorm_eps"] == lavis.LN_VISION_EPS
  again, _ = blip2_jax.from_pretrained(out)
  assert again.config.vision.post_eps == lavis.LN_VISION_EPS
  T.Blip2ForImageTextRetrieval.from_pretrained(out)


def test_stage2_opt(tmp_path):
  d = tiny.save_tiny(str(tmp_path / "hf"), "Blip2ForConditionalGeneration", "opt")
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
  # ln_vision is trained, so it comes from the checkpoint, not from the HF vision directory
  with torch.no_grad():
    hf.vision_model.post_layernorm.weight.add_(0.5)
  lv["ln_vision.weight"] = hf.vision_model.post_layernorm.weight.detach().clone()
  pth = _runner_file(lv, str(tmp_path / "checkpoint_0.pth"))  # no ViT: LAVIS's stage 2 freezes it
  llm_dir = str(tmp_path / "opt")
  hf.language_model.save_pretrained(llm_dir)
  with pytest.raises(ValueError, match="llm_dir"):
    lavis.load_lavis(pth, cfg, vision=d)
  with pytest.raises(ValueError, match=r"holds no ViT(.|\n)*vision="):
    lavis.load_lavis(pth, cfg, llm_dir=llm_dir)
  model, params, extras = lavis.load_lavis(pth, cfg, llm_dir=llm_dir, vision=d)
  np.testing.assert_array_equal(params["vision_model"]["post_layernorm"]["scale"], lv["ln_vision.weight"].numpy())
  assert extras == {}
  assert "intermediate" not in params["qformer"]["encoder"]["layers_0"]["layer_0"]
  rows = _compare(hf, model, params, cfg)
  assert {"vision", "qformer", "projection", "logits"} <= set(rows)


BOS = 98  # [DEC] of tiny.tiny_tokenizer("bert")


def _text_batch(seed=0):
  """BERT ids [CLS] words [SEP] [PAD]..., rows of different lengths, and their mask."""
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(5, 98, (4, 7), generator=g)
  mask = torch.ones(4, 7, dtype=torch.long)
  for i, n in enumerate((7, 5, 3, 6)):
    ids[i, 0], ids[i, n - 1] = 2, 3
    ids[i, n:], mask[i, n:] = 0, 0
  return ids, mask


def _torch_lm_head(lv, qcfg):
  """BERT cls.predictions from the LAVIS tensors, tied to the word embeddings."""
  p = "Qformer.cls.predictions."
  transform = T.models.bert.modeling_bert.BertPredictionHeadTransform(T.BertConfig(
      hidden_size=qcfg.hidden_size, hidden_act=qcfg.hidden_act, layer_norm_eps=qcfg.layer_norm_eps))
  transform.load_state_dict({k[len(p + "transform."):]: v for k, v in lv.items() if k.startswith(p + "transform.")})
  word = lv["Qformer.bert.embeddings.word_embeddings.weight"]
  return lambda h: transform(h) @ word.T + lv[p + "bias"]


def test_stage1_losses_match_lavis(tmp_path):
  """ITC / ITM / ITG of a stage-1 file as LAVIS's runner writes it (no ViT; the ViT from an
  eva_vit_g.pth-layout file), loaded from a config that gives only sizes, against LAVIS's
  Blip2Qformer.forward formulas (torch_ref: ln_vision eps 1e-5, LAVIS's hard-negative draws)."""
  hf, cfg, lv = _stage1(tmp_path, lavis_like=True, qformer_overrides=dict(num_hidden_layers=2))
  for i in range(cfg.vision.num_hidden_layers):
    for b in ("q_bias", "v_bias"):
      assert float(lv[f"visual_encoder.blocks.{i}.attn.{b}"].abs().min()) > 0
  pth = _runner_file(lv, str(tmp_path / "checkpoint_9.pth"))
  eva = _eva_file(lv, str(tmp_path / "eva_vit_g.pth"))
  # sizes only: no text path, and BERT's vocabulary without LAVIS's [DEC]
  q = dataclasses.replace(cfg.qformer, use_qformer_text_input=False, vocab_size=cfg.qformer.vocab_size - 1)
  model, params, extras = lavis.load_lavis(pth, dataclasses.replace(cfg, qformer=q), vision=eva)
  assert model.config.qformer.use_qformer_text_input
  assert model.config.qformer.vocab_size == cfg.qformer.vocab_size
  head, temp = lavis.qformer_head_params(extras, model)

  px = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
  ids, mask = _text_batch()
  lm_head = _torch_lm_head(lv, cfg.qformer)

  def lavis_losses(eps, **negatives):
    hf.vision_model.post_layernorm.eps = eps
    with torch.no_grad():
      return torch_ref.stage1_losses(hf, lm_head, px, ids, mask, temp=lv["temp"], bos_token_id=BOS,
                                     generator=torch.Generator().manual_seed(0), **negatives)
  ref = lavis_losses(lavis.LN_VISION_EPS)
  hf_eps = lavis_losses(1e-6, neg_img=ref["neg_img"], neg_txt=ref["neg_txt"])
  batch = {"pixel_values": jnp.asarray(px.permute(0, 2, 3, 1).numpy()),
           "input_ids": jnp.asarray(ids.numpy()), "attention_mask": jnp.asarray(mask.numpy())}
  _, ours = jax.jit(lambda p, h, t, b: losses.stage1_losses(
      model, p, h, t, b, bos_token_id=BOS, neg_image_idx=jnp.array(ref["neg_img"]),
      neg_text_idx=jnp.array(ref["neg_txt"])))(params, head, temp, batch)
  # measured: itc 2.4e-7 (value 1.59), itm 0 (0.67), itg 0 (20.7); our losses with HF's eps (1e-6)
  # for ln_vision, as load_lavis gave before: 2.2e-2 / 2.3e-3 / 6.5e-3 relative
  for k in ("itc", "itm", "itg"):
    assert_close(float(ours[k]), float(ref[k]), k)
    # HF's eps moves every loss far past the bound, so the test tells the two eps apart
    assert abs(float(hf_eps[k]) - float(ref[k])) > 10 * bound(float(ref[k])), k


def test_vision_sources(tmp_path):
  """The ViT from an eva_vit_g.pth-layout file or an HF directory; what LAVIS's strict=False
  would pass over silently is reported."""
  _, cfg, lv = _stage1(tmp_path)
  pth = _runner_file(lv, str(tmp_path / "checkpoint_0.pth"))
  eva = _eva_file(lv, str(tmp_path / "eva_vit_g.pth"))
  _, from_eva, _ = lavis.load_lavis(pth, cfg, vision=eva)
  _, from_hf, _ = lavis.load_lavis(pth, cfg, vision=str(tmp_path / "hf"))
  a, b = io.flatten(from_eva["vision_model"]), io.flatten(from_hf["vision_model"])
  assert a.keys() == b.keys()
  d = cfg.vision.hidden_size
  for k in a:  # equal, but for the k part of the fused bias (EVA has none, HF's is its own)
    keep = np.r_[0:d, 2 * d:3 * d] if k.endswith("qkv/bias") else slice(None)
    np.testing.assert_array_equal(np.asarray(a[k])[keep], np.asarray(b[k])[keep], err_msg=k)
  full = str(tmp_path / "full.pth")
  torch.save({"model": lv}, full)
  with pytest.raises(ValueError, match="already holds the ViT"):
    lavis.load_lavis(full, cfg, vision=eva)
  with pytest.raises(io.CheckpointError, match="not an EVA ViT"):
    lavis.load_lavis(pth, cfg, vision=pth)
  bad = torch.load(eva)
  bad["blocks.0.attn.rel_bias"] = torch.zeros(3)
  del bad["blocks.1.norm2.bias"]
  torch.save(bad, eva)
  with pytest.raises(io.CheckpointError, match=r"blocks\.0\.attn\.rel_bias"):
    lavis.load_lavis(pth, cfg, vision=eva)
  del bad["blocks.0.attn.rel_bias"]
  torch.save(bad, eva)
  with pytest.raises(io.CheckpointError, match=r"vision_model\.encoder\.layers\.1\.layer_norm2\.bias"):
    lavis.load_lavis(pth, cfg, vision=eva)


def test_eva_positions_interpolated(tmp_path):
  """An eva_vit_g.pth for fewer pixels than the config's image size: positions resized as LAVIS's
  interpolate_pos_embed does (torch bicubic, align_corners=False, the CLS position kept)."""
  _, cfg, lv = _stage1(tmp_path)
  pth = _runner_file(lv, str(tmp_path / "checkpoint_0.pth"))
  eva = _eva_file(lv, str(tmp_path / "eva_vit_g.pth"))
  big = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=56))  # grid 2 -> 4
  _, params, _ = lavis.load_lavis(pth, big, vision=eva)
  pos = lv["visual_encoder.pos_embed"]
  grid = pos[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
  patches = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
  ref = torch.cat([pos[:, :1], patches.flatten(1, 2)], 1)
  got = params["vision_model"]["embeddings"]["position_embedding"]
  assert_close(got, ref, "position embeddings")  # measured 1.8e-7 (values up to 1.4)


def test_not_lavis(tmp_path):
  bert = {"bert.embeddings.word_embeddings.weight": torch.zeros(5, 4),
          "cls.predictions.bias": torch.zeros(5)}
  pth = str(tmp_path / "bert.pth")
  torch.save(bert, pth)
  cfg = blip2.Blip2Config.from_hf(tiny.tiny_blip2_config(None), architecture="Blip2ForImageTextRetrieval")
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
