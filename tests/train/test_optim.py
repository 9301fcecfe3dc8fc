"""Freezing, weight decay, the schedule, accumulation and the train step on tiny real composites.

Measured (CPU, float32, jax 0.10.2; tolerances below sit ~5x above):
  accumulation, stage 2 (OPT), accum_steps=2 vs one step on the full batch of 4 (rows of 3, 6, 6
  and 7 tokens): loss diff 4.8e-7 (value 5.55), grad-norm rel diff 8e-8, updated params (one AdamW
  step, lr 1e-3, eps 1e-2) max abs diff 3.7e-9. With Adam's eps 1e-8 the params differ by 3.6e-7:
  entries with a ~0 gradient move by up to +-lr on the sign of their round-off, so the test uses
  eps 1e-2 (update Lipschitz in the gradient) to compare the gradients themselves.
Accumulation is tested on stage 2 only: its loss is a token mean, so token-weighted micro-batch
gradients equal the full-batch gradient exactly. Stage-1 ITC / ITM use in-batch negatives, so two
micro-batches of 2 see different negatives than one batch of 4: a different loss, not round-off.
"""
import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blip2_jax
from blip2_jax.checkpoints import io, tiny
from blip2_jax.models import qformer as Q
from blip2_jax.train import optim
from blip2_jax.train import step as S

from bounds import assert_close
from helpers import fresh

FROZEN_VIT, FROZEN_LLM = r"model/vision_model/.*", r"model/language_model/.*"
BOS = 98  # [DEC] of tiny.tiny_tokenizer("bert")
SMALL = dict(vision_overrides=dict(num_hidden_layers=1), qformer_overrides=dict(num_hidden_layers=2))


# ----------------------------------------------------------------------------------------
# fixtures: tiny stage-1 / stage-2 training trees and batches


def stage1_tree(model, params, seed=0):
  q = model.config.qformer
  head = nn.unbox(Q.QFormerLMHead(q).init(jax.random.PRNGKey(seed), *Q.init_args(q)[0])["params"])
  return {"model": params, "qformer_lm_head": head, "temp": jnp.asarray(0.07, jnp.float32)}


def stage1_batch(n, seed=0, t=7):
  r = np.random.default_rng(seed)
  ids = r.integers(5, 98, (n, t)).astype(np.int32)
  mask = np.ones((n, t), np.int32)
  for i in range(n):
    k = int(r.integers(3, t + 1))
    ids[i, 0], ids[i, k - 1] = 2, 3  # [CLS] ... [SEP]
    ids[i, k:], mask[i, k:] = 0, 0
  return {"pixel_values": r.standard_normal((n, 28, 28, 3)).astype(np.float32), "input_ids": ids,
          "attention_mask": mask}


def stage2_batch(n, seed=0, t=7):
  r = np.random.default_rng(seed)
  ids = r.integers(4, 110, (n, t)).astype(np.int32)
  ids[:, 0] = 2  # BOS
  mask = np.ones((n, t), np.int32)
  for i in range(n):
    k = int(r.integers(2, t + 1))
    ids[i, k:], mask[i, k:] = 1, 0
  labels = np.where(mask > 0, ids, -100).astype(np.int32)
  return {"pixel_values": r.standard_normal((n, 28, 28, 3)).astype(np.float32), "input_ids": ids,
          "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  d = tiny.save_tiny(str(tmp_path_factory.mktemp("ret")), "Blip2ForImageTextRetrieval", **SMALL)
  model, params = blip2_jax.from_pretrained(d)
  return model, stage1_tree(model, params)


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
  d = tiny.save_tiny(str(tmp_path_factory.mktemp("opt")), "Blip2ForConditionalGeneration", "opt",
                        text_overrides=dict(num_hidden_layers=1), **SMALL)
  model, params = blip2_jax.from_pretrained(d)
  return model, {"model": params}


# ----------------------------------------------------------------------------------------
# schedule, masks


def test_lr_schedule():
  peak, lo, init = 1e-4, 1e-5, 1e-6
  s = optim.lr_schedule(peak, warmup_steps=10, total_steps=110, min_lr=lo, warmup_init=init)
  want = {0: init, 5: init + (peak - init) / 2, 9: init + (peak - init) * 0.9, 10: peak,
          35: lo + (peak - lo) * (1 + np.cos(np.pi / 4)) / 2, 60: (peak + lo) / 2, 110: lo, 500: lo}
  for k, v in want.items():
    assert float(s(k)) == pytest.approx(v, rel=1e-5), k
  steps = np.arange(10, 111)
  got = np.array([float(s(int(k))) for k in steps])
  np.testing.assert_allclose(got, lo + (peak - lo) * (1 + np.cos(np.pi * (steps - 10) / 100)) / 2, rtol=1e-5)
  assert np.all(np.diff(got) <= 0)
  s0 = optim.lr_schedule(peak, warmup_steps=0, total_steps=100)
  assert float(s0(0)) == pytest.approx(peak) and float(s0(100)) == pytest.approx(0.0, abs=1e-12)


def test_path_mask_partition_merge(stage1):
  _, tree = stage1
  mask = optim.path_mask(tree, [FROZEN_VIT, r"temp"])
  flat_mask = io.flatten(mask)
  assert all(v == (k.startswith("model/vision_model/") or k == "temp") for k, v in flat_mask.items())
  trainable, frozen = optim.partition(tree, mask)
  assert set(io.flatten(frozen)) == {k for k, v in flat_mask.items() if v}
  assert set(io.flatten(trainable)) == {k for k, v in flat_mask.items() if not v}
  back = optim.merge(trainable, frozen)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)))  # same leaves, exactly
  # under jit as well (partition / merge are pure dict surgery)
  out = jax.jit(lambda t: optim.merge(*optim.partition(t, mask)))(tree)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree)))
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.path_mask(tree, [r"model/vision/.*"])  # typo: a frozen rule that freezes nothing


def _decayed_by_name(path):
  return path.rsplit("/", 1)[-1] in ("kernel", "embedding", "position_embedding", "class_embedding")


def test_decay_mask(stage1, tmp_path):
  _, tree = stage1
  flat = io.flatten(optim.decay_mask(tree))
  assert flat["temp"] is False and flat["model/query_tokens"] is False  # ndim 0 / ndim 3
  assert flat["model/qformer/layernorm/scale"] is False and flat["model/itm_head/bias"] is False
  assert flat["model/embeddings/word_embeddings/embedding"] is True
  assert flat["qformer_lm_head/transform/LayerNorm/scale"] is False
  assert flat["qformer_lm_head/transform/dense/kernel"] is True
  for k, v in flat.items():  # kernels and embedding tables decay; biases, norms, queries, temp do not
    assert bool(v) == _decayed_by_name(k), k
  # scanned stacks: a bias / norm scale is (layers, d), ndim 2, and must still not decay
  d = tiny.save_tiny(str(tmp_path / "opt"), "Blip2ForConditionalGeneration", "opt", tokenizer=False)
  _, p = blip2_jax.from_pretrained(d, scan=True)
  flat = io.flatten(optim.decay_mask({"model": p}))
  assert flat["model/language_model/model/decoder/layers/self_attn_layer_norm/scale"] is False
  assert flat["model/language_model/model/decoder/layers/fc1/bias"] is False
  assert flat["model/language_model/model/decoder/layers/fc1/kernel"] is True
  for k, v in flat.items():
    assert bool(v) == _decayed_by_name(k), k


def test_make_optimizer_decays_only_masked_leaves():
  tx = optim.make_optimizer(lr=0.1, weight_decay=0.5, clip_norm=None)
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}, "query_tokens": jnp.ones((1, 2, 2))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zeros, tx.init(params), params)  # zero gradient: only decay moves params
  np.testing.assert_allclose(upd["dense"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  assert not np.any(upd["dense"]["bias"]) and not np.any(upd["query_tokens"])
  clip = optim.make_optimizer(lr=1.0, b1=0.0, b2=0.0, weight_decay=0.0, clip_norm=1.0)
  g = {"w": jnp.full((4,), 10.0)}
  st = clip.init(g)
  # clip_by_global_norm runs first: the Adam step sees the clipped gradient (norm 20 -> 1)
  assert float(optax.tree.norm(clip.update(g, st, g)[0])) == pytest.approx(2.0, rel=1e-3)


def test_lr_scales_multiply_matching_modules():
  """One Adam step on unit gradients moves each weight by lr; lr_scales rules (first match wins)
  multiply it, and combine with nothing else when layer_decay is 1."""
  tx = optim.make_optimizer(lr=0.1, b1=0.0, b2=0.0, weight_decay=0.0, clip_norm=None,
                            lr_scales=(("model/vision_model/.*", 3.0), ("model/.*", 0.5)))
  params = {"model": {"vision_model": {"w": jnp.ones((2,))}, "qformer": {"w": jnp.ones((2,))}}, "temp": jnp.ones(())}
  g = jax.tree.map(jnp.ones_like, params)
  upd, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(upd["model"]["vision_model"]["w"], -0.3, rtol=1e-5)
  np.testing.assert_allclose(upd["model"]["qformer"]["w"], -0.05, rtol=1e-5)
  np.testing.assert_allclose(upd["temp"], -0.1, rtol=1e-5)
  with pytest.raises(ValueError, match="regex, factor"):
    optim.make_optimizer(lr=0.1, lr_scales=(("model/.*",),))


# ----------------------------------------------------------------------------------------
# the step


def test_frozen_tower_untouched_and_optimizer_state_only_trainable(stage1):
  model, tree = stage1
  tx = optim.make_optimizer(lr=1e-3)
  state = S.init_train_state(fresh(tree), [FROZEN_VIT], tx, frozen_dtype=jnp.bfloat16)
  vision = io.flatten(tree["model"]["vision_model"])
  frozen = io.flatten(state.frozen)
  assert set(frozen) == {f"model/vision_model/{k}" for k in vision}
  assert all(v.dtype == jnp.bfloat16 for v in frozen.values())  # frozen tower stored in bf16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state.trainable))  # float32 master weights
  before_frozen = {k: np.asarray(v).copy() for k, v in frozen.items()}
  before_train = {k: np.asarray(v).copy() for k, v in io.flatten(state.trainable).items()}

  step = jax.jit(S.make_train_step(S.stage1_loss_fn(model, bos_token_id=BOS), tx))  # with dropout
  rng = jax.random.PRNGKey(0)
  for i in range(3):
    state, m = step(state, stage1_batch(4, seed=i), jax.random.fold_in(rng, i))
    assert np.isfinite(float(m["loss"])) and {"itc", "itm", "itg", "grad_norm", "temp"} <= set(m)
  assert int(state.step) == 3
  after = io.flatten(state.frozen)
  for k, v in before_frozen.items():  # bit-identical, dtype kept
    assert after[k].dtype == jnp.bfloat16
    assert np.asarray(after[k]).view(np.uint16).tobytes() == v.view(np.uint16).tobytes(), k
  moved = [k for k, v in io.flatten(state.trainable).items() if not np.array_equal(np.asarray(v), before_train[k])]
  assert len(moved) == len(before_train)  # every trainable leaf was updated
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state.trainable))

  # Adam state: mu and nu mirror the trainable tree exactly; besides them only step counts
  trainable_shapes = [x.shape for x in jax.tree.leaves(state.trainable)]
  for name in ("mu", "nu"):
    (found,) = [t for _, t in optax.tree_utils.tree_get_all_with_path(state.opt_state, name)]
    assert jax.tree.structure(found) == jax.tree.structure(state.trainable)
    assert [x.shape for x in jax.tree.leaves(found)] == trainable_shapes
  n_train = len(trainable_shapes)
  leaves = jax.tree.leaves(state.opt_state)
  counts = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.integer)]
  assert len(leaves) == 2 * n_train + len(counts) and len(counts) <= 2 and all(x.shape == () for x in counts)
  assert sum(x.size for x in leaves) == 2 * S.count_params(state.trainable) + len(counts)
  opt_paths = optim.paths(state.opt_state)
  assert not [p for p in opt_paths if "vision_model" in p]


def _count(jaxpr, prim, dim):
  """Equations of primitive `prim` (nested jaxprs included) with an operand or result of size `dim`."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == prim:
      shapes = [v.aval.shape for v in list(eqn.invars) + list(eqn.outvars) if hasattr(v.aval, "shape")]
      n += any(dim in s for s in shapes)
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          n += _count(sub.jaxpr, prim, dim)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          n += _count(sub, prim, dim)
  return n


def _jaxpr(loss_fn, tree, frozen, batch):
  tx = optim.make_optimizer(lr=1e-3)
  state = jax.eval_shape(lambda t: S.init_train_state(t, frozen, tx), tree)
  return jax.make_jaxpr(S.make_train_step(loss_fn, tx))(state, batch, jax.random.PRNGKey(0)).jaxpr


def test_no_weight_gradients_for_frozen_towers(stage1, stage2):
  """The traced step holds only the forward matmuls of a frozen ViT (nothing before it trains, so no
  backward at all), and for a frozen LLM the forward plus the input gradients the Q-Former needs,
  never the weight gradients. Counted on matmuls touching the tower's MLP width (unique sizes:
  ViT 80, OPT 72) against the same step with everything trainable."""
  model, tree = stage1
  loss1 = S.stage1_loss_fn(model, bos_token_id=BOS)
  vit_layers = model.config.vision.num_hidden_layers
  frozen = _jaxpr(loss1, tree, [FROZEN_VIT], stage1_batch(4))
  full = _jaxpr(loss1, tree, [], stage1_batch(4))
  assert _count(frozen, "dot_general", 80) == 2 * vit_layers  # fc1, fc2 forward
  assert _count(full, "dot_general", 80) == 6 * vit_layers  # + input and weight gradients
  # the patch embedding is a matmul over 14 * 14 * 3 = 588 pixels: forward only, vs + its weight gradient
  assert _count(frozen, "dot_general", 588) == 1
  assert _count(full, "dot_general", 588) == 2

  model2, tree2 = stage2
  loss2 = S.stage2_loss_fn(model2, deterministic=True)
  llm_layers = model2.config.text.num_hidden_layers
  frozen = _jaxpr(loss2, tree2, [FROZEN_VIT, FROZEN_LLM], stage2_batch(4))
  full = _jaxpr(loss2, tree2, [FROZEN_VIT], stage2_batch(4))
  assert _count(frozen, "dot_general", 72) == 4 * llm_layers  # forward + input gradients
  assert _count(full, "dot_general", 72) == 6 * llm_layers  # + weight gradients
  assert _count(frozen, "dot_general", 80) == 2 * model2.config.vision.num_hidden_layers


def test_accumulation_equals_full_batch(stage2):
  model, tree = stage2
  tx = optim.make_optimizer(lr=1e-3, eps=1e-2)
  loss_fn = S.stage2_loss_fn(model, deterministic=True)
  batch = stage2_batch(4, seed=3)
  tokens = (batch["labels"] != -100).sum(1)
  assert tokens[:2].sum() != tokens[2:].sum()  # micro-batches of different token counts: weighting matters
  out = {}
  for k in (1, 2):
    state = S.init_train_state(fresh(tree), [FROZEN_VIT, FROZEN_LLM], tx)
    state, m = jax.jit(S.make_train_step(loss_fn, tx, accum_steps=k))(state, batch, jax.random.PRNGKey(0))
    out[k] = (state, m)
  (s1, m1), (s2, m2) = out[1], out[2]
  # Bounds: tests/bounds.py. Measured: loss and grad norm within float32 round-off; params after one
  # AdamW step 6.0e-8 = one float32 ulp of a weight in [0.5, 1) (under 2e-8 at XLA's default
  # optimisation level). Micro-batches weighted equally instead of by tokens move the grad norm by
  # percents, far above the bound.
  assert_close(float(m2["loss"]), float(m1["loss"]), "loss")
  assert_close(float(m2["grad_norm"]) / float(m1["grad_norm"]), 1.0, "grad norm ratio")
  assert int(m1["num_tokens"]) == int(m2["num_tokens"]) == int((batch["labels"] != -100).sum())
  jax.tree.map(lambda a, b: assert_close(a, b, "params"), s2.trainable, s1.trainable)
  with pytest.raises(ValueError, match="not divisible by accum_steps"):
    jax.eval_shape(S.make_train_step(loss_fn, tx, accum_steps=3), s1, batch, jax.random.PRNGKey(0))


def test_lr_metric_follows_schedule(stage2):
  model, tree = stage2
  sched = optim.lr_schedule(1e-3, warmup_steps=2, total_steps=4, warmup_init=0.0)
  tx = optim.make_optimizer(lr=sched)
  state = S.init_train_state(fresh(tree), [FROZEN_VIT, FROZEN_LLM], tx)
  step = jax.jit(S.make_train_step(S.stage2_loss_fn(model, deterministic=True), tx, schedule=sched))
  lrs = []
  for i in range(3):
    before = copy.deepcopy(jax.device_get(state.trainable))
    state, m = step(state, stage2_batch(4, seed=i), jax.random.PRNGKey(i))
    lrs.append(float(m["lr"]))
    if i == 0:  # lr 0 at step 0: AdamW moves nothing (decay is scaled by the lr too)
      assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.trainable)))
  np.testing.assert_allclose(lrs, [0.0, 5e-4, 1e-3], rtol=1e-6)
