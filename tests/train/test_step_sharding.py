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
