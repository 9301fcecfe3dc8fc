"""Freezing, decay mask, schedule, accumulation and the train step on tiny real composites."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from blip2_jax.train import optim, setup, step as S
from configs import stage1, stage2


def _setup(recipe, **over):
  c = recipe.get_config("tiny")
  for k, v in over.items():
    c.model[k] = v
  return c, setup.build(c)


def _batch(c, st, n=4, seed=0):
  from blip2_jax.train import batches
  from blip2_jax.data import synthetic
  from blip2_jax.processing import ImageProcessor
  src = synthetic.ShapesSource(n, seed=seed)
  recs = [src[i] for i in range(n)]
  px = ImageProcessor(c.model.image_size)([r["image"] for r in recs])
  raw = {"image": px, "text": np.array([r["caption"] for r in recs])}
  if c.task == "stage1":
    enc = st.qformer_tokenizer([r["caption"] for r in recs], padding="max_length", max_length=c.data.max_txt_len,
                               truncation=True, return_tensors="np")
    raw.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
  return batches.make_batch_fn(c, st)(raw, np.random.default_rng(0))


def test_schedule():
  f = optim.lr_schedule(1e-4, warmup_steps=10, total_steps=110, min_lr=1e-5, warmup_init=1e-6)
  np.testing.assert_allclose([f(0), f(5), f(10), f(60), f(110)],
                             [1e-6, 1e-6 + 0.5 * (1e-4 - 1e-6), 1e-4, 1e-5 + 0.5 * (1e-4 - 1e-5), 1e-5], rtol=1e-5)


def test_partition_merge_and_decay_mask():
  c, st = _setup(stage1)
  mask = optim.path_mask(st.params, c.frozen)
  tr, fr = optim.partition(st.params, mask)
  assert set(fr) == {"model"} and set(fr["model"]) == {"vision_model"}
  assert "vision_model" not in tr["model"] and {"qformer_lm_head", "temp"} <= set(tr)
  back = optim.merge(tr, fr)
  assert jax.tree.structure(back) == jax.tree.structure(st.params)
  dm = {optim.path_of(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(optim.decay_mask(tr))[0]}
  assert dm["temp"] is False and dm["model/query_tokens"] is False
  assert all(not v for p, v in dm.items() if p.endswith("/bias") or "LayerNorm" in p or "layernorm" in p)
  assert dm["model/qformer/encoder/layers_0/layer_0/attention/attention/query/kernel"] is True
  assert dm["model/embeddings/word_embeddings/embedding"] is True
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.path_mask(st.params, [r"model/visionmodel/.*"])


def test_frozen_bit_identical_and_no_frozen_state_or_grads():
  c, st = _setup(stage1)
  tx = optim.make_optimizer(lr=1e-3)
  state = S.init_train_state(st.params, c.frozen, tx)
  frozen0 = jax.tree.map(np.array, state.frozen)
  # the optimizer state mirrors the trainable leaves only (Adam mu and nu, one each)
  # (0-d leaves are left out of the comparison: temp's moments and Adam's step count look alike)
  shapes = [x.shape for x in jax.tree.leaves(state.trainable) if x.ndim > 0]
  big = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert sorted(big) == sorted(shapes * 2)
  n_all = len(jax.tree.leaves(st.params))
  assert len(shapes) < n_all - 20  # the ViT's leaves are not among them
  loss_fn = S.stage1_loss_fn(st.model, bos_token_id=st.qformer_tokenizer.bos_token_id)
  step = jax.jit(S.make_train_step(loss_fn, tx))
  batch = _batch(c, st)
  for i in range(2):
    state, m = step(state, batch, jax.random.PRNGKey(i))
  for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(a, b)
  assert int(state.step) == 2 and np.isfinite(float(m["loss"]))
  # no weight gradient of the frozen ViT is computed: the backward pass has no dot_general whose
  # output has a ViT weight's shape (the ViT's MLP kernel (44, 80) appears only when it is trained)
  vit_kernel = st.params["model"]["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].shape

  def weight_grad_shapes(frozen_patterns):
    s = S.init_train_state(st.params, frozen_patterns, tx)
    jaxpr = jax.make_jaxpr(S.make_train_step(loss_fn, tx))(s, batch, jax.random.PRNGKey(0))
    return [tuple(e.outvars[0].aval.shape) for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert vit_kernel not in weight_grad_shapes(c.frozen)
  assert vit_kernel in weight_grad_shapes([])


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for p in e.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _eqns(getattr(inner, "jaxpr", inner))


def test_accumulation_equals_full_batch():
  """Stage 2 (a per-token loss): 2 micro-batches == one batch (token-weighted), one update each."""
  c, st = _setup(stage2, dropout=False)
  tx = optim.make_optimizer(lr=1e-3, clip_norm=None)
  loss_fn = S.stage2_loss_fn(st.model, deterministic=True)
  batch = _batch(c, st, n=4)
  outs = []
  for accum in (1, 2):
    state = S.init_train_state(st.params, c.frozen, tx)
    state, m = jax.jit(S.make_train_step(loss_fn, tx, accum_steps=accum))(state, batch, jax.random.PRNGKey(0))
    outs.append((state, m))
  (s1, m1), (s2, m2) = outs
  assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
  assert float(m1["num_tokens"]) == float(m2["num_tokens"])
  diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s1.trainable), jax.tree.leaves(s2.trainable)))
  assert diff < 1e-6, diff  # measured 5.0e-7 (first Adam step: updates of size lr = 1e-3)


def test_frozen_dtype_bf16():
  c, st = _setup(stage2)
  state = S.init_train_state(st.params, c.frozen, optim.make_optimizer(lr=1e-3), frozen_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {jnp.dtype("bfloat16")}
  assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype("float32")}
