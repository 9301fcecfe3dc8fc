"""The train step: gradients of the trainable subtree only, AdamW, accumulation, sharded jit.

    shardings = tree_shardings(model, params, mesh)                  # from the modules' logical axes
    state = init_train_state(params, config.frozen, tx, frozen_dtype="bfloat16", shardings=shardings)
    step = jit_train_step(make_train_step(stage1_loss_fn(model, bos_token_id=dec), tx), mesh, state)
    state, metrics = step(state, global_batch, rng)

The state holds the trainable leaves (float32 master weights), the frozen leaves (optionally
bf16) and the optimizer state of the trainable leaves only. `jax.grad` is taken w.r.t.
`state.trainable` with the frozen tree closed over, so no weight gradient of a frozen tower is
computed: a frozen ViT (nothing before it trains) gets no backward pass at all, a frozen LLM only
the input gradients the Q-Former needs (tests/train/test_optim.py counts the traced matmuls).
Mixed precision: the model computes in its config dtype (e.g. from_pretrained(dtype=bf16)); the
trainable leaves stay float32 master weights, frozen ones may be stored in `frozen_dtype`.

Per-device gradients: when every parameter is replicated (a data-parallel mesh) and the loss has a
per-device form (`stage1_loss_fn`'s `per_device`), `jit_train_step` computes the loss and its
gradient inside jax.shard_map on each device's rows and sums the gradients with ONE psum. Under
XLA's partitioner alone, every weight-gradient matmul over the batch-sharded rows is all-reduced
where it is computed, inside the backward layer loop of each pass; stage 1 runs the Q-Former four
times (ITC image, ITC text, ITM, ITG), so its gradients crossed the network four times (2.7x the
gradient bytes; benchmarks/RESULTS.md, "TPU, compiled ahead of time"). XLA's all-reduce
reassociation does not reach into the loops, whose per-layer results are stacked, not summed.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from blip2_jax.checkpoints import io
from blip2_jax.core import sharding as shd
from blip2_jax.models import blip2, qformer
from blip2_jax.train import losses, optim

LossFn = Callable[[dict, dict, jax.Array], tuple[jax.Array, dict]]
BATCH_AXES = ("data", "fsdp")
# the mesh of a data-parallel step being traced by jit_train_step (see make_train_step)
_PER_DEVICE_MESH: contextvars.ContextVar = contextvars.ContextVar("per_device_mesh", default=None)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: Any
  frozen: Any
  opt_state: Any


# ----------------------------------------------------------------------------------------
# loss adapters over the training tree (see train/setup.py for its layout)


def stage1_loss_fn(model, *, bos_token_id: int, deterministic: bool = False, **loss_kw) -> LossFn:
  """ITC + ITM + ITG on {"model", "qformer_lm_head", "temp"}; metrics: itc, itm, itg, temp.

  `.per_device(params, rows, rng, axis_name, row_exchange)`: the same loss on one device's rows
  inside jax.shard_map -> (share, (summed metrics, replicated metrics)); psum over `axis_name` of
  the share, of its gradient and of the summed metrics gives the global values
  (losses.stage1_losses)."""
  def run(params, batch, rng, **kw):
    return losses.stage1_losses(model, params["model"], params["qformer_lm_head"], params["temp"],
                                batch, rng, bos_token_id=bos_token_id, deterministic=deterministic,
                                **kw, **loss_kw)

  def fn(params, batch, rng):
    total, parts = run(params, batch, rng)
    return total, dict(parts, temp=params["temp"])

  def per_device(params, batch, rng, axis_name, row_exchange="all_gather"):
    total, parts = run(params, batch, rng, axis_name=axis_name, row_exchange=row_exchange)
    return total, (parts, dict(temp=params["temp"]))

  fn.per_device = per_device
  return fn


def stage2_loss_fn(model, *, deterministic: bool = False) -> LossFn:
  """The LM (OPT / LLaMA) or prefix-LM (T5) loss on {"model"}; metrics: num_tokens."""
  def fn(params, batch, rng):
    loss, aux = losses.stage2_loss(model, params["model"], batch, rng, deterministic=deterministic)
    return loss, {"num_tokens": aux["num_tokens"]}
  return fn


# ----------------------------------------------------------------------------------------
# state


def tree_shardings(model, tree: dict, mesh, rules=shd.DEFAULT_RULES) -> dict:
  """NamedShardings of a training tree ({"model", ["qformer_lm_head", "temp"]}): `shd.param_shardings`
  of its abstract parameters, so the composite and the Q-Former LM head shard by their modules'
  logical axis names (dimensions the mesh does not divide replicated) and the temperature is
  replicated."""
  abstract = {"model": io.abstract_params(model, **blip2.dummy_inputs(model.config))}
  if "qformer_lm_head" in tree:
    q = model.config.qformer
    head = qformer.QFormerLMHead(q, "decoder" not in tree["qformer_lm_head"])
    abstract["qformer_lm_head"] = io.abstract_params(head, *qformer.init_args(q)[0])
  for k in tree:
    abstract.setdefault(k, tree[k])  # unboxed leaves: replicated
  return shd.param_shardings(abstract, mesh, rules, warn=False)


def _cast_floats(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree)


def init_train_state(params: dict, frozen_patterns, tx: optax.GradientTransformation, *,
                     frozen_dtype=None, shardings: dict | None = None) -> TrainState:
  """Partitions `params` by the frozen regexes, casts trainable leaves to float32 and frozen ones to
  `frozen_dtype` (if given), places them in `shardings` (a tree like `params`, from
  `tree_shardings`) and initialises the optimizer on the trainable leaves only (Adam's mu / nu
  sharded like their parameters, see `opt_state_shardings`).

  The state may share buffers with `params` (a cast or placement that changes nothing is a no-op),
  and `jit_train_step` donates the state: do not use `params` after the first step."""
  mask = optim.path_mask(params, list(frozen_patterns)) if frozen_patterns else jax.tree.map(lambda _: False, params)
  trainable, frozen = optim.partition(params, mask)
  trainable = _cast_floats(trainable, jnp.float32)
  if frozen_dtype is not None:
    frozen = _cast_floats(frozen, jnp.dtype(frozen_dtype))
  if shardings is not None:
    sh_train, sh_frozen = optim.partition(shardings, mask)
    trainable = jax.device_put(trainable, sh_train)
    frozen = jax.device_put(frozen, sh_frozen)
    mesh = jax.tree.leaves(shardings)[0].mesh
    repl = NamedSharding(mesh, P())
    # jit(tx.init) alone would replicate mu / nu (zeros carry no sharding to propagate): place them
    # explicitly like the parameters they mirror
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, trainable, sh_train, mesh))(trainable)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), repl), trainable=trainable, frozen=frozen,
                      opt_state=opt_state)
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                    opt_state=tx.init(trainable))


def abstract_train_state(params: dict, frozen_patterns, tx: optax.GradientTransformation, *, shardings: dict,
                         frozen_dtype=None) -> TrainState:
  """What `init_train_state(params, ..., shardings=shardings)` returns, as jax.ShapeDtypeStructs that
  carry their shardings: `params` may be abstract and nothing is allocated, so the step compiles ahead
  of time for devices that are not attached (python -m blip2_jax.aot)."""
  state = jax.eval_shape(lambda p: init_train_state(p, frozen_patterns, tx, frozen_dtype=frozen_dtype), params)
  mask = optim.path_mask(params, list(frozen_patterns)) if frozen_patterns else jax.tree.map(lambda _: False, params)
  sh_train, sh_frozen = optim.partition(shardings, mask)
  mesh = jax.tree.leaves(shardings)[0].mesh
  sh = TrainState(step=NamedSharding(mesh, P()), trainable=sh_train, frozen=sh_frozen,
                  opt_state=opt_state_shardings(tx, state.trainable, sh_train, mesh))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, sh)


def opt_state_shardings(tx: optax.GradientTransformation, trainable, trainable_shardings, mesh=None):
  """Shardings of `tx.init(trainable)`: every params-shaped subtree of the optimizer state (Adam's
  mu and nu) takes the shardings of the parameters it mirrors (`optax.tree_map_params`), the rest
  (step counts) is replicated."""
  mesh = mesh if mesh is not None else jax.tree.leaves(trainable_shardings)[0].mesh
  abstract = jax.eval_shape(tx.init, trainable)
  return optax.tree_map_params(tx, lambda _, sh: sh, abstract, trainable_shardings,
                               transform_non_params=lambda _: NamedSharding(mesh, P()))


def state_shardings(state: TrainState):
  """The shardings of a placed (or abstract, sharding-annotated) state, for jit in/out shardings
  and checkpoint restore."""
  return jax.tree.map(lambda x: x.sharding, state)


def batch_sharding(mesh) -> NamedSharding:
  """Batches shard their leading axis over (data, fsdp)."""
  return NamedSharding(mesh, P(BATCH_AXES))


# ----------------------------------------------------------------------------------------
# step


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, accum_steps: int = 1,
                    schedule: optax.Schedule | None = None):
  """-> step(state, batch, rng) -> (state, metrics).

  accum_steps > 1 splits the batch's leading axis into that many micro-batches (lax.scan) and
  averages their gradients, weighted by their `num_tokens` metric when the loss reports one
  (token-mean LM losses), else equally. Stage-1 losses then see in-batch negatives of a
  micro-batch only (as LAVIS without accumulation would on a smaller batch).
  metrics: the loss, its parts, grad_norm (before clipping), lr (when `schedule` is given).
  """
  if accum_steps < 1:
    raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
  global_grad = jax.value_and_grad(lambda tp, fr, b, r: loss_fn(optim.merge(tp, fr), b, r), has_aux=True)
  per_device = getattr(loss_fn, "per_device", None)

  def grad_fn(tp, fr, b, r):
    mesh = _PER_DEVICE_MESH.get()
    if mesh is None or per_device is None:
      return global_grad(tp, fr, b, r)
    return _per_device_grad(per_device, mesh, tp, fr, b, r)

  def step(state: TrainState, batch: dict, rng: jax.Array):
    if accum_steps == 1:
      (loss, metrics), grads = grad_fn(state.trainable, state.frozen, batch, rng)
    else:
      def split(x):
        if x.shape[0] % accum_steps:
          raise ValueError(f"batch size {x.shape[0]} is not divisible by accum_steps={accum_steps}")
        return x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:])
      micro = jax.tree.map(split, batch)

      def body(carry, xs):
        i, mb = xs
        (l, m), g = grad_fn(state.trainable, state.frozen, mb, jax.random.fold_in(rng, i))
        w = m.get("num_tokens", jnp.float32(1.0)).astype(jnp.float32)
        gsum, lsum, wsum = carry
        gsum = jax.tree.map(lambda a, b: a + w * b, gsum, g)
        return (gsum, lsum + w * l, wsum + w), m

      zeros = jax.tree.map(jnp.zeros_like, state.trainable)
      (gsum, lsum, wsum), ms = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)),
                                            (jnp.arange(accum_steps), micro))
      grads = jax.tree.map(lambda g: g / wsum, gsum)
      loss = lsum / wsum
      metrics = jax.tree.map(lambda v: v.sum(0) if jnp.issubdtype(v.dtype, jnp.integer) else v.mean(0), ms)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), metrics)

  return step


# TPU device kinds whose slices above this many chips run with "limited ICI routing", where the TPU
# compiler (libtpu 0.0.42) refuses a ragged all-to-all: v5e above 16 chips (v5e-64 and v5e-256 are
# refused, v5e-16 compiles; so do v4-64, v5p-256 and v6e-256)
_NO_RAGGED_ABOVE = {"TPU v5 lite": 16, "TPU v5e": 16}


def row_exchange(mesh) -> str:
  """How stage 1's per-device step fetches the rows of other devices (the hard negatives):
  "ragged" (only the rows asked for, one ragged all-to-all) on TPU slices whose compiler accepts it,
  else "all_gather" (the whole global batch's rows: XLA:CPU has no ragged all-to-all, GPUs keep the
  all-gather)."""
  dev = mesh.devices.flat[0]
  if dev.platform != "tpu" or mesh.devices.size > _NO_RAGGED_ABOVE.get(dev.device_kind, mesh.devices.size):
    return "all_gather"
  return "ragged"


def _per_device_grad(per_device, mesh, trainable, frozen, batch, rng):
  """((loss, metrics), grads) of `per_device` summed over the devices of `mesh` (parameters
  replicated, batch rows split over BATCH_AXES): the gradients are reduced once, after every pass."""
  exchange = row_exchange(mesh)

  def body(tp, fr, b, r):
    def share(tp):
      return per_device(optim.merge(tp, fr), b, r, BATCH_AXES, exchange)
    # logical sharding constraints name mesh axes that are manual in here: none apply per device
    with nn.logical_axis_rules(()):
      (loss, (summed, kept)), grads = jax.value_and_grad(share, has_aux=True)(tp)
    loss, summed, grads = jax.lax.psum((loss, summed, grads), BATCH_AXES)
    return (loss, dict(summed, **kept)), grads

  # check_vma off: gradients w.r.t. the replicated parameters stay per-device inside (the one psum
  # above sums them), instead of a psum at every use of a parameter in the layer loops
  return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(BATCH_AXES), P()), out_specs=P(),
                       check_vma=False)(trainable, frozen, batch, rng)


def _replicated(shardings) -> bool:
  is_sh = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
  return all(s.is_fully_replicated for s in jax.tree.leaves(shardings, is_leaf=is_sh))


@contextlib.contextmanager
def _per_device_mesh(mesh):
  token = _PER_DEVICE_MESH.set(mesh)
  try:
    yield
  finally:
    _PER_DEVICE_MESH.reset(token)


def jit_train_step(step, mesh, state: TrainState, *, rules=shd.DEFAULT_RULES, donate: bool = True):
  """`step` compiled over `mesh`: the state keeps its shardings, batches are split over
  (data, fsdp), metrics come back replicated; activations follow the modules' logical
  constraints under `rules`. The old state's buffers are donated. When the state is replicated
  (data parallel), a `make_train_step` step whose loss has a per-device form computes its
  gradients per device and reduces them once (see the module docstring).

  `state`: a placed TrainState (its arrays' shardings are used) or a TrainState of shardings
  (`state_shardings(...)`)."""
  is_sh = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
  leaves = jax.tree.leaves(state, is_leaf=is_sh)
  st_sh = state if leaves and all(is_sh(x) for x in leaves) else state_shardings(state)
  repl = NamedSharding(mesh, P())
  # every parameter whole on every device: losses with a per-device form reduce their gradients once
  dp_mesh = mesh if _replicated(st_sh.trainable) and _replicated(st_sh.frozen) else None

  def run(state, batch, rng):
    with nn.logical_axis_rules(rules), _per_device_mesh(dp_mesh):
      return step(state, batch, rng)

  jitted = jax.jit(run, in_shardings=(st_sh, batch_sharding(mesh), repl), out_shardings=(st_sh, repl),
                   donate_argnums=(0,) if donate else ())

  def call(state, batch, rng):
    with jax.set_mesh(mesh):
      return jitted(state, batch, rng)
  call.jitted = jitted
  return call


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
