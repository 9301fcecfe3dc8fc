"""The same stage-1 (ITC + ITM + ITG) and stage-2 (OPT LM) train steps on one device and on the 8
CPU devices of tests/conftest.py under the meshes (8,1,1), (2,4,1) and (2,2,2): equal losses and
updated trainable parameters within float32 round-off (reduction order only).

Global batch 8, 2 AdamW steps (lr 1e-3, clip 1.0), no dropout; stage 1 gets fixed hard-negative
indices so the ITM pairs cannot differ between runs. Measured max abs diffs vs one device (CPU,
jax 0.10.2), params of order 1:
  stage 1: losses 0 (values 7.49, 7.47), params <= 1.6e-7 (the temperature, |grad| ~ 10)
  stage 2: losses 0 (values 5.21, 4.92), params <= 6.0e-8
The bounds are tests/bounds.py's float32 goal (1e-5 x the largest |reference|). XLA logs "Involuntary full
rematerialization" on some meshes (embedding gathers with fsdp-sharded tables); harmless here.
"""
import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from test_optim import BOS, FROZEN_LLM, FROZEN_VIT, stage1_batch, stage1_tree, stage2_batch  # noqa: E402

import blip2_jax
from blip2_jax.checkpoints import io, tiny
from blip2_jax.core import sharding as shd
from blip2_jax.train import optim
from blip2_jax.train import step as S

from bounds import assert_close
from helpers import fresh

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
# 1 ViT layer, 1 Q-Former layer (with cross-attention), 1 OPT layer: short backward compiles
TINY = dict(vision_overrides=dict(num_hidden_layers=1), qformer_overrides=dict(num_hidden_layers=1))
NEG_IMAGE = np.array([3, 0, 5, 1, 7, 2, 4, 6], np.int32)  # no index is its own row
NEG_TEXT = np.array([1, 4, 0, 6, 2, 7, 3, 5], np.int32)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  d1 = tiny.save_tiny(str(tmp_path_factory.mktemp("ret")), "Blip2ForImageTextRetrieval", **TINY)
  m1, p1 = blip2_jax.from_pretrained(d1)
  d2 = tiny.save_tiny(str(tmp_path_factory.mktemp("opt")), "Blip2ForConditionalGeneration", "opt",
                         text_overrides=dict(num_hidden_layers=1), **TINY)
  m2, p2 = blip2_jax.from_pretrained(d2)
  return {
      "stage1": dict(model=m1, tree=stage1_tree(m1, p1), frozen=[FROZEN_VIT],
                     loss_fn=S.stage1_loss_fn(m1, bos_token_id=BOS, deterministic=True,
                                              neg_image_idx=NEG_IMAGE, neg_text_idx=NEG_TEXT),
                     batches=[stage1_batch(8, seed=i) for i in range(2)]),
      "stage2": dict(model=m2, tree={"model": p2}, frozen=[FROZEN_VIT, FROZEN_LLM],
                     loss_fn=S.stage2_loss_fn(m2, deterministic=True),
                     batches=[stage2_batch(8, seed=i) for i in range(2)]),
  }


def _tx():
  # eps 1e-2, not 1e-8: Adam divides by sqrt(v) + eps, so an entry whose true gradient is ~0 (e.g.
  # 1e-10) moves by up to +-lr on the sign of its round-off alone (measured: 1.6e-3 on
  # vision_projection with eps 1e-8); with eps 1e-2 the update is Lipschitz in the gradient
  # (<= lr / eps = 0.1) and the comparison tests the gradients, which sharding may only reorder.
  return optim.make_optimizer(lr=1e-3, eps=1e-2)


_REF = {}


def _reference(case, name):
  """Two steps on one device, no mesh."""
  if name not in _REF:
    tx = _tx()
    state = S.init_train_state(fresh(case["tree"]), case["frozen"], tx)
    step = jax.jit(S.make_train_step(case["loss_fn"], tx))
    losses = []
    for i, b in enumerate(case["batches"]):
      state, m = step(state, b, jax.random.PRNGKey(i))
      losses.append(float(m["loss"]))
    _REF[name] = (losses, jax.device_get(state.trainable))
  return _REF[name]


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("name", ["stage1", "stage2"])
def test_sharded_step_equals_single_device(cases, name, mesh_shape):
  case = cases[name]
  ref_losses, ref_params = _reference(case, name)
  mesh = shd.make_mesh(mesh_shape)
  tx = _tx()
  shardings = S.tree_shardings(case["model"], case["tree"], mesh)
  state = S.init_train_state(fresh(case["tree"]), case["frozen"], tx, shardings=shardings)

  # placement: parameters by their logical axes, Adam's mu / nu exactly like the parameters
  train_sh = jax.tree.map(lambda x: x.sharding, state.trainable)
  for name_ in ("mu", "nu"):
    (moment,) = [t for _, t in optax.tree_utils.tree_get_all_with_path(state.opt_state, name_)]
    assert jax.tree.map(lambda x: x.sharding, moment) == train_sh
  if mesh_shape != (8, 1, 1):  # pure data parallel replicates every parameter
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.trainable))
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.frozen))

  step = S.jit_train_step(S.make_train_step(case["loss_fn"], tx), mesh, state)
  bsh = S.batch_sharding(mesh)
  losses = []
  for i, b in enumerate(case["batches"]):
    state, m = step(state, jax.device_put(b, bsh), jax.random.PRNGKey(i))
    losses.append(float(m["loss"]))
  # the state keeps its shardings through the step (out_shardings = in_shardings)
  assert jax.tree.map(lambda x: x.sharding, state.trainable) == train_sh
  assert all(isinstance(x.sharding, NamedSharding) for x in jax.tree.leaves(state))

  loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
  got, want = io.flatten(jax.device_get(state.trainable)), io.flatten(ref_params)
  assert got.keys() == want.keys()
  diffs = {k: float(np.abs(got[k] - want[k]).max()) for k in got}
  worst = max(diffs, key=diffs.get)
  print(f"{name} {mesh_shape}: losses {losses}, loss diff {loss_diff:.2e}, param diff {diffs[worst]:.2e} ({worst})")
  assert_close(losses, ref_losses, "losses")
  for k in got:
    assert_close(got[k], want[k], k)


@pytest.mark.parametrize("full", [False, True])
def test_per_device_stage1_loss_equals_the_global_one(cases, full):
  """losses.stage1_losses(axis_name=...) inside jax.shard_map over (data, fsdp) of mesh (4, 2, 1),
  the psum of its shares and of their gradients, against the loss on the global batch: hard
  negatives SAMPLED here (the same draws), both ITC gradient modes. Measured (CPU): loss 9.5e-7
  (value 8.0), gradients <= 5.2e-7."""
  from jax.sharding import PartitionSpec as P

  from blip2_jax.train import losses
  case = cases["stage1"]
  model, tree, batch = case["model"], case["tree"], case["batches"][0]
  axes = S.BATCH_AXES

  def loss(t, b, rng, **kw):
    return losses.stage1_losses(model, t["model"], t["qformer_lm_head"], t["temp"], b, rng, bos_token_id=BOS,
                                itc_full_gradient=full, **kw)
  (ref, ref_parts), ref_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(tree, batch, jax.random.key(1))

  def body(t, b, rng):
    (l, parts), g = jax.value_and_grad(lambda t: loss(t, b, rng, axis_name=axes), has_aux=True)(t)
    return jax.lax.psum((l, parts, g), axes)
  run = jax.jit(jax.shard_map(body, mesh=shd.make_mesh((4, 2, 1)), in_specs=(P(), P(axes), P()), out_specs=P(),
                              check_vma=False))
  got, parts, grads = run(tree, batch, jax.random.key(1))
  assert_close(float(got), float(ref), "loss")
  for k in ref_parts:
    assert_close(float(parts[k]), float(ref_parts[k]), k)
  got_g, want_g = io.flatten(jax.device_get(grads)), io.flatten(jax.device_get(ref_grads))
  for k in want_g:
    assert_close(got_g[k], want_g[k], k)


def test_data_parallel_stage1_reduces_its_gradients_once(cases):
  """Mesh (8, 1, 1) replicates every parameter, so the stage-1 step runs per device (train/step.py):
  its compiled program all-reduces the gradients in one all-reduce outside every layer loop (XLA's
  partitioner alone reduces them inside each of the four passes' backward loops), and its FLOPs
  equal the one-device step's."""
  from blip2_jax.core import flops, hlo
  case = cases["stage1"]
  tx = _tx()
  mesh = shd.make_mesh((8, 1, 1))
  state = S.init_train_state(fresh(case["tree"]), case["frozen"], tx,
                             shardings=S.tree_shardings(case["model"], case["tree"], mesh))
  step = S.jit_train_step(S.make_train_step(case["loss_fn"], tx), mesh, state)
  batch, rng = jax.device_put(case["batches"][0], S.batch_sharding(mesh)), jax.random.PRNGKey(0)
  with jax.set_mesh(mesh):
    text = step.jitted.lower(state, batch, rng).compile().as_text()
    sharded_flops = flops.count_flops(step.jitted, state, batch, rng)
  colls, _ = hlo.collectives(text, mesh)
  reduces = [c for c in colls if c.kind == "all-reduce"]
  grad_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.trainable))
  assert not any(c.in_loop for c in colls)
  assert [c.bytes >= grad_bytes for c in reduces].count(True) == 1
  assert sum(c.bytes for c in reduces) < 1.1 * grad_bytes
  one = S.init_train_state(fresh(case["tree"]), case["frozen"], tx)
  assert sharded_flops == flops.count_flops(jax.jit(S.make_train_step(case["loss_fn"], tx)), one,
                                            case["batches"][0], rng)


@pytest.mark.parametrize("platform, kind, n, want", [
    ("cpu", "cpu", 8, "all_gather"), ("gpu", "NVIDIA H100 80GB HBM3", 8, "all_gather"),
    ("tpu", "TPU v5", 64, "ragged"), ("tpu", "TPU v4", 32, "ragged"), ("tpu", "TPU v6 lite", 256, "ragged"),
    ("tpu", "TPU v5 lite", 16, "ragged"), ("tpu", "TPU v5 lite", 256, "all_gather")])
def test_row_exchange_where_the_compiler_has_a_ragged_all_to_all(platform, kind, n, want):
  """The hard negatives' rows travel by ragged all-to-all only where the backend compiles one: TPU,
  except v5e slices above 16 chips (libtpu: "not supported in limited ICI routing settings")."""
  import types
  dev = types.SimpleNamespace(platform=platform, device_kind=kind)
  assert S.row_exchange(types.SimpleNamespace(devices=np.array([dev] * n, dtype=object))) == want
