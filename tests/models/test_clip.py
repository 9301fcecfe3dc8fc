"""Parity of blip2_jax.models.clip (CLIPModel) against HF transformers' CLIPModel (eager, float32, CPU),
its loading / saving, CLIP's image preprocessing and `inference.clip_scores`.

Tiny random models (tiny.save_tiny_clip: 2 layers per tower, text 32 wide, vision head dim 11) with
every weight moved off its init. Measured max abs diffs are in the comments (CPU, jax 0.10.2, torch
2.13, transformers 5.23); bounds are the project's float32 goal (tests/bounds.py).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

import blip2_jax
from blip2_jax.checkpoints import io, tiny
from blip2_jax.data import processing
from blip2_jax.inference import clip as clip_inference
from blip2_jax.models import clip, registry, vit
from blip2_jax.models import layers as L

from bounds import BF16_REL, assert_close, max_diff
from helpers import count_traces


# ----------------------------------------------------------------------------------------
# helpers


def load_both(path, **runtime):
  """(HF CLIPModel, our model, params) from one directory."""
  ref = transformers.CLIPModel.from_pretrained(str(path), attn_implementation="eager").eval()
  model, params = blip2_jax.from_pretrained(str(path), **runtime)
  return ref, model, params


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """The tiny CLIP (quick_gelu, eos 519 = the tokenizer's <|endoftext|>, first-position pooling)."""
  path = tiny.save_tiny_clip(str(tmp_path_factory.mktemp("clip")))
  return (path, *load_both(path))


def text_inputs(cfg: clip.TextConfig, lengths, seed: int = 0):
  """Right-padded rows ending in an end-of-text token (the largest id, as CLIP's tokenizer makes it,
  or `eos_token_id` under the first-position rule), padded with it, ids otherwise random."""
  rng = np.random.default_rng(seed)
  t = max(lengths) + 2
  legacy = cfg.eos_token_id == clip.LEGACY_EOS
  eos = cfg.vocab_size - 1 if legacy else cfg.eos_token_id
  ids = np.full((len(lengths), t), eos, np.int64)
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    row = rng.integers(3, cfg.vocab_size - 1, n - 1)
    ids[i, :n - 1] = np.where(row == eos, eos - 1, row)
    mask[i, :n] = 1
  return torch.from_numpy(ids), torch.from_numpy(mask)


_apply = jax.jit(lambda model, params, px, ids, mask, interpolate: model.apply(
    {"params": params}, px, ids, mask, interpolate_pos_encoding=interpolate), static_argnums=(0, 5))


def forward(model, params, px, ids, mask, interpolate=False):
  """Jitted forward (one compile per model and shape: faster than op-by-op on the CPU)."""
  return _apply(model, params, jnp.asarray(px.permute(0, 2, 3, 1).numpy()), jnp.asarray(ids.numpy()),
                jnp.asarray(mask.numpy()), interpolate)


def compare(ref, out) -> dict[str, float]:
  """Asserts every output within bounds; returns the measured diffs. `ref` = (HF CLIPOutput, HF vision
  tower output, HF text tower output): HF 5's CLIPModel puts the PROJECTED pooled output in its
  *_model_output.pooler_output; ours keep the towers' (as CLIPVisionModel / CLIPTextModel)."""
  ref, vis, text = ref
  pairs = {
      "vision last_hidden_state": (out["vision_model_output"]["last_hidden_state"], vis.last_hidden_state),
      "vision pooler_output": (out["vision_model_output"]["pooler_output"], vis.pooler_output),
      "text last_hidden_state": (out["text_model_output"]["last_hidden_state"], text.last_hidden_state),
      "text pooler_output": (out["text_model_output"]["pooler_output"], text.pooler_output),
      "image_embeds": (out["image_embeds"], ref.image_embeds),
      "text_embeds": (out["text_embeds"], ref.text_embeds),
      "logits_per_image": (out["logits_per_image"], ref.logits_per_image),
  }
  return {k: assert_close(a, b, k) for k, (a, b) in pairs.items()}


def run_both(ref_model, model, params, px, ids, mask, interpolate=False):
  with torch.no_grad():
    ref = (ref_model(input_ids=ids, pixel_values=px, attention_mask=mask, interpolate_pos_encoding=interpolate),
           ref_model.vision_model(pixel_values=px, interpolate_pos_encoding=interpolate),
           ref_model.text_model(input_ids=ids, attention_mask=mask))
  return ref, forward(model, params, px, ids, mask, interpolate)


# ----------------------------------------------------------------------------------------
# parity


VARIANTS = {
    "base": {},
    # the OpenAI checkpoints' legacy eos_token_id 2: pooled at the argmax of the ids; exact gelu
    "legacy_eos_gelu": dict(text_overrides=dict(eos_token_id=2, hidden_act="gelu", layer_norm_eps=1e-6),
                            vision_overrides=dict(hidden_act="gelu", layer_norm_eps=1e-6)),
    # first position of an eos id that is not the largest; 32 px / patch 8, 8 heads of 4, one
    # channel; 20 text positions; projection 16
    "first_eos_sizes": dict(text_overrides=dict(eos_token_id=300, max_position_embeddings=20),
                            vision_overrides=dict(image_size=32, patch_size=8, hidden_size=32,
                                                  num_attention_heads=8, num_channels=1),
                            projection_dim=16),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity(base, tmp_path, name):
  if name == "base":
    ref_model, model, params = base[1:]
  else:
    ref_model, model, params = load_both(tiny.save_tiny_clip(str(tmp_path), tokenizer=False, **VARIANTS[name]))
  cfg = model.config
  torch.manual_seed(1)
  v = cfg.vision
  px = torch.randn(2, v.num_channels, v.image_size, v.image_size)
  ids, mask = text_inputs(cfg.text, [5, 9, 3])  # batch 3, padded to 11
  # the two pooling rules pick different positions on these rows, so the test tells them apart
  argmax = ids.argmax(-1)
  first = (ids == cfg.text.eos_token_id).int().argmax(-1)
  if name != "base":
    assert not torch.equal(argmax, first)
  ref, out = run_both(ref_model, model, params, px, ids, mask)
  # measured (vision last / pooled, text last / pooled, image / text embeds, logits_per_image; hidden
  # states up to ~5, logits up to ~10): base 7.2e-7 / 4.8e-7, 1.1e-6 / 7.5e-7, 1.1e-7 / 1.6e-7, 1.9e-6;
  # legacy_eos_gelu 9.5e-7 / 4.8e-7, 1.3e-6 / 7.2e-7, 1.2e-7 / 1.3e-7, 2.9e-6;
  # first_eos_sizes 9.5e-7 / 2.7e-7, 9.5e-7 / 7.2e-7, 1.5e-7 / 1.4e-7, 3.8e-6
  compare(ref, out)


def test_interpolate_pos_encoding(base):
  """Trained at 28 px / patch 14 (2 x 2 patches), run at 42 x 70 (3 x 5: upsampled, non-square);
  vit's tests check the bicubic resize itself at more sizes."""
  _, ref_model, model, params = base
  torch.manual_seed(2)
  px = torch.randn(2, 3, 42, 70)
  ids, mask = text_inputs(model.config.text, [4, 6])
  ref, out = run_both(ref_model, model, params, px, ids, mask, interpolate=True)
  assert out["vision_model_output"]["last_hidden_state"].shape == (2, 1 + 3 * 5, 44)
  # measured: vision last 1.2e-6 / pooled 6.6e-7, image embeds 1.6e-7, logits 5.7e-6
  compare(ref, out)


def test_interpolate_at_native_size_and_size_errors(base):
  _, _, model, params = base
  px = jnp.asarray(np.random.default_rng(0).standard_normal((1, 28, 28, 3)), jnp.float32)
  emb = clip.VisionEmbeddings(model.config.vision)
  f = lambda x, interp: emb.apply({"params": params["vision_model"]["embeddings"]}, x, interp)
  np.testing.assert_array_equal(np.asarray(f(px, False)), np.asarray(f(px, True)))
  with pytest.raises(ValueError, match=r"\(42\*42\) doesn't match model \(28\*28\).*interpolate_pos_encoding"):
    f(jnp.zeros((1, 42, 42, 3)), False)
  with pytest.raises(ValueError, match="17 text tokens but the model has 16 positions"):
    model.apply({"params": params}, jnp.ones((1, 17), jnp.int32), method="text_features")


# ----------------------------------------------------------------------------------------
# scan / dtype


def test_scan_vs_unrolled(base):
  path, _, model, params = base
  torch.manual_seed(3)
  px, (ids, mask) = torch.randn(2, 3, 28, 28), text_inputs(model.config.text, [4, 7])
  ref = forward(model, params, px, ids, mask)
  scanned = L.unrolled_to_scan(params)
  assert scanned["text_model"]["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
  out = forward(clip.CLIPModel(model.config.replace_runtime(scan=True)), scanned, px, ids, mask)
  for k in ("logits_per_image", "image_embeds", "text_embeds"):  # measured: bitwise equal
    np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(ref[k]), err_msg=k)
  # the loader fills a scanned tree straight from the checkpoint
  m2, p2 = blip2_jax.from_pretrained(path, scan=True)
  assert m2.config.vision.scan and m2.config.text.scan
  jax.tree.map(np.testing.assert_array_equal, p2, scanned)


def test_bf16(base):
  path, ref_model, _, _ = base
  model, params = blip2_jax.from_pretrained(path, dtype=jnp.bfloat16)
  torch.manual_seed(4)
  px, (ids, mask) = torch.randn(2, 3, 28, 28), text_inputs(model.config.text, [5, 8, 3])
  ref, out = run_both(ref_model, model, params, px, ids, mask)
  assert out["vision_model_output"]["last_hidden_state"].dtype == jnp.bfloat16
  assert params["logit_scale"].dtype == jnp.float32  # exp(logit_scale) stays exact
  ref, vis, text = ref
  # bf16 compute and params (float32 norm statistics, softmax, normalisation, logit scale) against torch
  # fp32, measured: vision last 4.2e-2 (values up to 4.4), text last 3.0e-2 (3.8), logits 9.1e-2 (8.7),
  # image / text embeds 2.7e-3 / 6.9e-3
  for k, a, b in (("vision last", out["vision_model_output"]["last_hidden_state"],
                   vis.last_hidden_state),
                  ("text last", out["text_model_output"]["last_hidden_state"], text.last_hidden_state),
                  ("logits_per_image", out["logits_per_image"], ref.logits_per_image)):
    assert_close(a, b, f"bf16 {k}", rel=BF16_REL)


# ----------------------------------------------------------------------------------------
# loading, saving, config


def test_strict_loading(base, tmp_path):
  path, ref_model, model, _ = base
  sd = {k: v.numpy() for k, v in ref_model.state_dict().items()}
  sd["text_model.embeddings.position_ids"] = np.arange(16)[None]  # older checkpoints hold the buffers
  sd["vision_model.embeddings.position_ids"] = np.arange(5)[None]
  cfg_json = json.loads(open(f"{path}/config.json").read())

  def write(state, config=cfg_json):
    d = tmp_path / f"ck{len(list(tmp_path.iterdir()))}"
    io.save_state_dict(str(d), state)
    (d / "config.json").write_text(json.dumps(config))
    return str(d)

  m, _ = blip2_jax.from_pretrained(write(sd))  # the buffers are allowed
  assert m.config == model.config
  # the OpenAI repositories' config.json: sizes in text_config_dict / vision_config_dict (transformers
  # folds them into the tower configs)
  legacy = dict(cfg_json, text_config={}, vision_config={}, text_config_dict=cfg_json["text_config"],
                vision_config_dict=cfg_json["vision_config"])
  m, _ = blip2_jax.from_pretrained(write(sd, legacy))
  assert m.config == model.config
  missing = {k: v for k, v in sd.items() if k != "text_model.encoder.layers.1.self_attn.k_proj.bias"}
  with pytest.raises(blip2_jax.CheckpointError, match=r"1 missing tensors:\n  text_model\.encoder\.layers\.1\."
                     r"self_attn\.k_proj\.bias"):
    blip2_jax.from_pretrained(write(missing))
  extra = dict(sd, **{"vision_model.embeddings.patch_embedding.bias": np.zeros(44, np.float32)})
  with pytest.raises(blip2_jax.CheckpointError, match=r"unexpected tensors.*\n  vision_model\.embeddings\."
                     r"patch_embedding\.bias"):  # CLIP's patch conv has no bias
    blip2_jax.from_pretrained(write(extra))


def test_save_then_transformers_reload(base, tmp_path):
  _, ref_model, model, params = base
  blip2_jax.save_pretrained(model, params, str(tmp_path))
  back = transformers.CLIPModel.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  ref_sd, back_sd = ref_model.state_dict(), back.state_dict()
  assert sorted(ref_sd) == sorted(back_sd)
  for k in ref_sd:
    torch.testing.assert_close(back_sd[k], ref_sd[k], rtol=0, atol=0, msg=k)
  torch.manual_seed(5)
  px, (ids, mask) = torch.randn(2, 3, 28, 28), text_inputs(model.config.text, [6, 4])
  with torch.no_grad():
    a = ref_model(input_ids=ids, pixel_values=px, attention_mask=mask).logits_per_image
    b = back(input_ids=ids, pixel_values=px, attention_mask=mask).logits_per_image
  assert max_diff(a, b) == 0.0
  assert back.config.text_config.eos_token_id == ref_model.config.text_config.eos_token_id
  assert clip.CLIPConfig.from_hf(back.config) == model.config


def test_config_round_trip_and_errors():
  c = clip.CLIPConfig.from_hf(tiny.tiny_clip_config(text_overrides=dict(eos_token_id=2, hidden_act="gelu"),
                                                    vision_overrides=dict(image_size=[32, 32], patch_size=8)),
                              scan=True, dtype="bfloat16")
  assert (c.text.eos_token_id, c.text.hidden_act, c.vision.image_size, c.projection_dim) == (2, "gelu", 32, 24)
  assert c.vision.scan and c.text.dtype == "bfloat16"
  hf = c.to_hf()
  assert isinstance(hf, transformers.CLIPConfig) and hf.architectures == ["CLIPModel"]
  runtime = dict(scan=True, dtype="bfloat16")
  assert clip.CLIPConfig.from_hf(hf, **runtime) == c
  assert clip.CLIPConfig.from_hf(hf.to_dict(), **runtime) == c
  assert clip.CLIPConfig.from_hf(transformers.CLIPConfig()) == clip.CLIPConfig()  # HF's defaults
  assert c.replace_runtime(scan=False, dtype="float32") == clip.CLIPConfig.from_hf(hf)
  bad = hf.to_dict()
  with pytest.raises(ValueError, match="unknown activation 'nope'"):
    clip.CLIPConfig.from_hf(dict(bad, text_config=dict(bad["text_config"], hidden_act="nope")))
  with pytest.raises(ValueError, match=r"eos_token_id=\[2, 3\] is not supported"):
    clip.CLIPConfig.from_hf(dict(bad, text_config=dict(bad["text_config"], eos_token_id=[2, 3])))
  with pytest.raises(ValueError, match="image_size=.*only square"):
    clip.CLIPConfig.from_hf(dict(bad, vision_config=dict(bad["vision_config"], image_size=[32, 48])))
  with pytest.raises(ValueError, match="'CLIPForImageClassification' is not supported"):
    clip.CLIPConfig.from_hf(dict(bad, architectures=["CLIPForImageClassification"]))
  with pytest.raises(ValueError, match="not divisible"):
    clip.VisionConfig(hidden_size=45, num_attention_heads=4)


def test_registry_and_axes(base):
  _, _, model, params = base
  assert registry.capabilities(model) == {registry.ITC}
  assert registry.composite_class("CLIPModel") is clip.CLIPModel
  with pytest.raises(TypeError, match="retrieval needs .*CLIPModel has none"):
    registry.require(model, registry.ITM, "retrieval")
  abstract = io.abstract_params(model, **clip.dummy_inputs(model.config))
  spec = io.flatten(nn.get_partition_spec(abstract))
  P = jax.sharding.PartitionSpec
  assert spec["text_model/encoder/layers_0/self_attn/q_proj/kernel"] == P("embed", "heads")
  assert spec["vision_model/encoder/layers_1/mlp/fc1/kernel"] == P("embed", "mlp")
  assert spec["vision_model/embeddings/position_embedding"] == P("pos", "embed")
  assert spec["text_model/embeddings/token_embedding/embedding"] == P("vocab", "embed")
  assert spec["visual_projection/kernel"] == P("embed", None) and spec["logit_scale"] == P()
  with pytest.raises(TypeError, match="CLIP scoring needs a CLIPModel"):
    clip_inference.clip_scores(vit.VisionModel(vit.VisionConfig()), params, None, np.zeros((1, 28, 28, 3)), [[]])


# ----------------------------------------------------------------------------------------
# preprocessing and clip_scores


def _photos():
  import skimage.data as skdata
  from PIL import Image
  return [Image.fromarray(skdata.astronaut()), Image.fromarray(skdata.coffee()).rotate(90, expand=True),
          Image.fromarray(skdata.chelsea()).convert("L")]  # square, portrait, grayscale landscape


def test_clip_image_processor_equals_hf(base, tmp_path):
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  path = base[0]
  ours = processing.ImageProcessor.from_pretrained(path)
  assert (ours.size, ours.shortest_edge) == ((28, 28), 28)
  for size, crop in ((224, 224), (28, 28), (40, 48)):  # 48 > 40: HF zero-pads
    hf = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})
    mine = processing.ImageProcessor(crop, shortest_edge=size)
    for im in _photos():
      a = mine(im)
      b = hf(im, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
      assert a.shape == (1, crop, crop, 3) and np.abs(a - b).max() == 0.0  # measured 0.0: bit-equal
  # our to_dict loads in transformers as a CLIP processor; the OpenAI configs' int sizes read as CLIP's
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(mine.to_dict()))
  back = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
  assert back.size["shortest_edge"] == 40 and back.crop_size["height"] == 48
  legacy = processing.ImageProcessor.from_dict({"feature_extractor_type": "CLIPFeatureExtractor", "size": 224,
                                                "crop_size": 224, "do_center_crop": True})
  assert (legacy.size, legacy.shortest_edge) == ((224, 224), 224)
  with pytest.raises(ValueError, match="do_center_crop only"):
    processing.ImageProcessor.from_dict({"image_processor_type": "CLIPImageProcessor", "do_center_crop": False})


def test_clip_scores_equal_hf_cosine(base):
  path, ref_model, model, params = base
  tok = processing.load_tokenizer(path)
  hf_proc = transformers.AutoImageProcessor.from_pretrained(path)
  images = _photos()
  pixel_values = processing.ImageProcessor.from_pretrained(path)(images)
  texts = [["a photo of a cat", "a dog", "", "a photo of a dog and a cat on a mat under a tree"],  # 4th truncated
           [], ["a cat"], ["photo", "dog dog dog", "a cat?"]]
  pixel_values = np.concatenate([pixel_values, pixel_values[:1]])  # 4 images, batch 3: one padded batch
  with count_traces() as traces:
    scores = clip_inference.clip_scores(model, params, tok, pixel_values, texts, batch_size=3, text_batch_size=4)
  assert [s.shape for s in scores] == [(4,), (0,), (1,), (3,)]
  # one image program and one text program, whatever the batches hold (2 image, 2 text batches)
  assert sorted(t for t in traces if t in ("image", "text")) == ["image", "text"]
  flat = [t for ts in texts for t in ts]
  enc = tok(flat, padding=True, truncation=True, max_length=16, return_tensors="pt")
  px = torch.from_numpy(hf_proc(images + images[:1], return_tensors="np")["pixel_values"])
  with torch.no_grad():
    out = ref_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px)
    cos = (out.logits_per_image / ref_model.logit_scale.exp()).numpy()
  owner = np.repeat(np.arange(len(texts)), [len(t) for t in texts])
  ref = cos[owner, np.arange(len(flat))]
  # measured 8.9e-8 (cosines up to 0.49)
  assert_close(np.concatenate(scores), ref, "clip_scores")
  assert enc["input_ids"].shape[1] == 16  # the long caption was truncated to the 16 positions
  assert clip_inference.clip_scores(model, params, tok, pixel_values[:0], []) == []
  with pytest.raises(ValueError, match="4 images but 3 lists of texts"):
    clip_inference.clip_scores(model, params, tok, pixel_values, texts[:3])
