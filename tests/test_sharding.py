"""Sharded loading on 8 virtual CPU devices (tests/conftest.py): placement, values, logits.

Policy for dimensions their mesh axes do not divide (tiny dims like 44, real ones like the
Q-Former vocab 30523 or Vicuna's 32001): the loader replicates that dimension over those axes
(`sharding.fit_spec`) and warns once, listing the leaves; every other leaf keeps its rule sharding.

Measured: jitted logits with sharded params vs unsharded params, max abs diff <= 1.7e-6 (values
up to 4.6) on every mesh below (reduction order only).
"""
import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import blip2_jax
from blip2_jax.checkpoints import io, parity, tiny
from blip2_jax.core import sharding as shd
from blip2_jax.models import blip2

from bounds import assert_close

NOT_DIVIDED = "mesh axes do not divide"

# every dim divides by 8: vision 48 / 96 (heads of 12), Q-Former 32 / 64, OPT 40 / 72, vocab 120
DIVISIBLE = dict(vision_overrides=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1),
                 text_overrides=dict(num_hidden_layers=1), qformer_overrides=dict(num_hidden_layers=2))
# default tiny vision width 44: divides by 2 and 4, not by 8
UNEVEN = dict(vision_overrides=dict(num_hidden_layers=1), text_overrides=dict(num_hidden_layers=1),
              qformer_overrides=dict(num_hidden_layers=2))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  made = {}

  def get(name):
    if name not in made:
      d = str(tmp_path_factory.mktemp(name))
      if name == "retrieval":
        tiny.save_tiny(d, "Blip2ForImageTextRetrieval", None)
      else:
        tiny.save_tiny(d, "Blip2ForConditionalGeneration", "opt", **(DIVISIBLE if name == "even" else UNEVEN))
      model, params = blip2_jax.from_pretrained(d)
      inp = parity.make_inputs(model.config, batch=8)
      kw = dict(pixel_values=inp["pixel_values"], input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
      made[name] = (d, model, params, kw)
    return made[name]
  return get


_REF_LOGITS = {}


def _ref_logits(model, params, kw):
  """Unsharded jitted logits, compiled once per checkpoint."""
  key = id(params)
  if key not in _REF_LOGITS:
    _REF_LOGITS[key] = (params, _logits(model, params, kw))  # keep params alive: ids stay unique
  return _REF_LOGITS[key][1]


def _load(d, mesh, **kw):
  """from_pretrained with a mesh; returns (model, params, messages of not-divided warnings)."""
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    model, params = blip2_jax.from_pretrained(d, mesh=mesh, **kw)
  return model, params, [str(x.message) for x in w if NOT_DIVIDED in str(x.message)]


def _rule_shardings(model, mesh, rules=shd.DEFAULT_RULES):
  """What the logical rules alone give, computed from each box's names."""
  abstract = io.abstract_params(model, **blip2.dummy_inputs(model.config))
  flat = {}
  for path, box in jax.tree_util.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    key = "/".join(p.key for p in path)
    names = box.names if isinstance(box, nn.Partitioned) else (None,) * len(box.shape)
    flat[key] = NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))
  return flat


def _check_placement_and_values(params, ref, want):
  got, r = io.flatten(params), io.flatten(ref)
  assert got.keys() == r.keys() == want.keys()
  for k, v in got.items():
    assert v.sharding == want[k], (k, v.sharding, want[k])
    shard_shape = v.sharding.shard_shape(v.shape)
    # no device holds more than its block: the full leaf is never materialised on one device
    assert all(s.data.shape == shard_shape for s in v.addressable_shards), k
    assert v.dtype == r[k].dtype, k
    np.testing.assert_array_equal(np.asarray(v), np.asarray(r[k]), err_msg=k)


def _logits(model, params, kw, mesh=None):
  if mesh is None:
    return jax.jit(model.apply)({"params": params}, **kw)["logits"]
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
    return jax.jit(model.apply)({"params": params}, **kw)["logits"]


def _leaf(params, path):
  return io.flatten(params)[path]


Q = "language_model/model/decoder/layers_0/self_attn/q_proj/kernel"  # (embed, heads) (40, 40)
E = "language_model/model/decoder/embed_tokens/embedding"  # (vocab, embed) (120, 40)


@pytest.mark.parametrize("shape,q_shard,e_shard,apply", [
    ((2, 2, 2), (20, 20), (60, 20), True),
    ((8, 1, 1), (40, 40), (120, 40), True),  # pure data parallel: params replicated
    ((1, 1, 8), (40, 5), (15, 40), True),
    ((1, 8, 1), (5, 40), (120, 5), False),
])
def test_sharded_load(ckpt, shape, q_shard, e_shard, apply):
  d, model, ref, kw = ckpt("even")
  mesh = shd.make_mesh(shape)
  _, params, notes = _load(d, mesh)
  assert not notes  # every dimension divides: nothing falls back
  _check_placement_and_values(params, ref, _rule_shardings(model, mesh))
  q, e = _leaf(params, Q), _leaf(params, E)
  assert q.sharding == NamedSharding(mesh, P("fsdp", "tensor"))
  assert e.sharding == NamedSharding(mesh, P("tensor", "fsdp"))
  assert q.addressable_shards[0].data.shape == q_shard
  assert e.addressable_shards[0].data.shape == e_shard
  if apply:
    want = _ref_logits(model, ref, kw)
    got = _logits(model, params, kw, mesh)
    assert_close(got, want, "sharded logits")  # measured <= 1.7e-6 (see above)


def test_uneven_dims_fall_back_to_replication(ckpt):
  d, model, ref, kw = ckpt("uneven")
  mesh = shd.make_mesh((1, 8, 1))
  _, params, notes = _load(d, mesh)
  assert len(notes) == 1, notes
  assert ("vision_model/encoder/layers_0/self_attn/qkv/kernel (44, 132): dim 0 (size 44): dropped 'fsdp' (8)"
          in notes[0])
  assert "language_model" not in notes[0]  # the OPT dims (40, 72, 120) divide
  want = _rule_shardings(model, mesh)
  qkv = "vision_model/encoder/layers_0/self_attn/qkv/kernel"
  assert want[qkv].spec == P("fsdp", "tensor")  # what the rules ask for, but 44 % 8 != 0
  want[qkv] = NamedSharding(mesh, P(None, "tensor"))
  flat = io.flatten(params)
  for k, v in flat.items():  # every vision leaf with a 44 dim lost only that axis
    if k != qkv and v.sharding != want[k]:
      assert 44 in v.shape, k
      want[k] = v.sharding
  _check_placement_and_values(params, ref, want)
  assert _leaf(params, Q).addressable_shards[0].data.shape == (5, 40)  # still sharded
  got, exp = _logits(model, params, kw, mesh), _ref_logits(model, ref, kw)
  assert_close(got, exp, "sharded logits")
  # (2, 2, 2): 44 divides by 2, so the same checkpoint needs no fallback
  _, _, notes = _load(d, shd.make_mesh((2, 2, 2)))
  assert not notes


def test_odd_qformer_vocab(ckpt):
  d, model, ref, _ = ckpt("retrieval")  # Q-Former vocab 99, like the real 30523: odd
  mesh = shd.make_mesh((2, 2, 2))
  _, params, notes = _load(d, mesh)
  assert "embeddings/word_embeddings/embedding (99, 32): dim 0 (size 99): dropped 'tensor' (2)" in notes[0]
  w = _leaf(params, "embeddings/word_embeddings/embedding")
  assert w.sharding == NamedSharding(mesh, P(None, "fsdp"))
  assert w.addressable_shards[0].data.shape == (99, 16)
  np.testing.assert_array_equal(np.asarray(w), np.asarray(_leaf(ref, "embeddings/word_embeddings/embedding")))


def test_fit_spec():
  mesh = shd.make_mesh((2, 2, 2))
  assert shd.fit_spec(P("fsdp", "tensor"), (4, 6), mesh) == (P("fsdp", "tensor"), [])
  assert shd.fit_spec(P(("data", "fsdp"), None), (6, 3), mesh) == (
      P(("data",), None), ["dim 0 (size 6): dropped 'fsdp' (2)"])
  assert shd.fit_spec(P("tensor"), (3, 5), mesh) == (P(None), ["dim 0 (size 3): dropped 'tensor' (2)"])


def test_scanned_sharded_load_reads_only_its_layers(ckpt):
  """Scanned leaves are stacked per device block; with `layers` mapped to a mesh axis each
  device reads only its own layers."""
  d, model, _, kw = ckpt("uneven")
  smodel, sref = blip2_jax.from_pretrained(d, scan=True)
  mesh = shd.make_mesh((2, 2, 2))
  rules = tuple(r for r in shd.DEFAULT_RULES if r[0] != "layers") + (("layers", "data"),)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _, params = blip2_jax.from_pretrained(d, scan=True, mesh=mesh, axis_rules=rules)
  k = "qformer/encoder/layers/layer_0/crossattention/attention/query/kernel"  # 1 group of 2 layers
  assert _leaf(sref, k).shape == (1, 32, 32)
  vis = "vision_model/encoder/layers/mlp/fc1/kernel"
  v = _leaf(params, vis)
  assert v.shape == (1, 44, 80) and v.sharding.spec == P(None, "fsdp", "tensor")  # 1 layer: data dropped
  flat, r = io.flatten(params), io.flatten(sref)
  for name, x in flat.items():
    assert all(s.data.shape == x.sharding.shard_shape(x.shape) for s in x.addressable_shards), name
    np.testing.assert_array_equal(np.asarray(x), np.asarray(r[name]), err_msg=name)
  # two scanned OPT layers split over data=2: each device block holds one layer
  d2 = tiny.save_tiny(str(os.path.join(os.path.dirname(d), "opt2")), "Blip2ForConditionalGeneration", "opt",
                         vision_overrides=dict(num_hidden_layers=2, hidden_size=48, intermediate_size=96))
  _, p2 = blip2_jax.from_pretrained(d2, scan=True, mesh=mesh, axis_rules=rules)
  _, r2 = blip2_jax.from_pretrained(d2, scan=True)
  q = _leaf(p2, "language_model/model/decoder/layers/self_attn/q_proj/kernel")
  assert q.sharding.spec == P("data", "fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (1, 20, 20)
  for name, x in io.flatten(p2).items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(io.flatten(r2)[name]), err_msg=name)


def test_sharded_params_do_not_alias_the_file(tmp_path):
  """On CPU, make_array_from_callback may keep a numpy buffer as the device buffer; a view of the
  memory-mapped checkpoint would then change (or fault) when the file is rewritten in place."""
  # The default tiny checkpoint: with the old loader 3 of its leaves (the 64-byte aligned ones
  # with no transpose) aliased the file and turned to zeros below.
  d = tiny.save_tiny(str(tmp_path), "Blip2ForConditionalGeneration", "opt")
  _, ref = blip2_jax.from_pretrained(d)
  _, params, _ = _load(d, shd.make_mesh((2, 2, 2)), dtype=jnp.float32)
  path = f"{d}/model.safetensors"
  size = os.path.getsize(path)
  with open(path, "r+b") as f:  # same inode: any live memory map sees this
    f.seek(4096)
    f.write(b"\0" * (size - 4096))
  for k, v in io.flatten(ref).items():
    np.testing.assert_array_equal(np.asarray(io.flatten(params)[k]), np.asarray(v), err_msg=k)


def test_sharded_bfloat16_load(ckpt):
  d, _, ref, _ = ckpt("even")
  mesh = shd.make_mesh((2, 2, 2))
  _, params, _ = _load(d, mesh, dtype=jnp.bfloat16)
  q = _leaf(params, Q)
  assert q.dtype == jnp.bfloat16 and q.sharding == NamedSharding(mesh, P("fsdp", "tensor"))
  np.testing.assert_array_equal(np.asarray(q), np.asarray(_leaf(ref, Q)).astype(jnp.bfloat16))
  assert params["query_tokens"].dtype == jnp.float32  # Q-Former params stay float32
