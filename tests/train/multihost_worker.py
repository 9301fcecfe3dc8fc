"""One process of the multi-host test (tests/train/test_multihost.py); not a test itself.

    python multihost_worker.py OUT.json PROCESS_ID NUM_PROCESSES PORT MODE

Every process holds 4 // NUM_PROCESSES CPU devices; together they form one (2, 2, 1) mesh.
MODE "step": the stage-1 train step on a fixed global batch, each process supplying only its own
rows through jax.make_array_from_process_local_data; writes the losses and the updated parameters.
MODE "loop": the tiny stage-2 recipe through blip2_jax.train.loop (per-process data shards, orbax
checkpoints written by all processes) for 2 of 4 steps, then a resume to the end.
MODE "both": "step" then "loop" in the same processes (one start-up for the test's two checks).
"""
import json
import os
import sys

out_path, pid, nproc, port, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
# LLVM optimisation off: tiny programs, where compiling dominates (both sides of the comparison alike)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // nproc} --xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if nproc > 1:
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid)

import numpy as np  # noqa: E402

from blip2_jax.core import sharding as shd  # noqa: E402
from blip2_jax.train import batches, setup  # noqa: E402
from blip2_jax.train import step as S
from configs import stage1  # noqa: E402


def global_rows(c, st, n=8):
  from blip2_jax.data import synthetic
  from blip2_jax.data.processing import ImageProcessor
  src = synthetic.ShapesSource(n, seed=0)
  recs = [src[i] for i in range(n)]
  enc = st.qformer_tokenizer([r["caption"] for r in recs], padding="max_length", max_length=c.data.max_txt_len,
                             truncation=True, return_tensors="np")
  raw = {"image": ImageProcessor(c.model.image_size)([r["image"] for r in recs]),
         "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
  return batches.make_batch_fn(c, st)(raw, None)


def run_step():
  c = stage1.get_config("tiny")
  st = setup.build(c)
  mesh = shd.make_mesh((2, 2, 1))
  # plain SGD: Adam's first steps are ~lr * sign(grad), which turns reduction-order round-off in
  # near-zero gradients into lr-sized differences and would hide what this test compares
  import optax
  tx = optax.sgd(0.1)
  state = S.init_train_state(st.params, c.frozen, tx, shardings=S.tree_shardings(st.model, st.params, mesh))
  loss_fn = S.stage1_loss_fn(st.model, bos_token_id=st.qformer_tokenizer.bos_token_id, deterministic=True)
  step = S.jit_train_step(S.make_train_step(loss_fn, tx), mesh, state)
  full = global_rows(c, st)
  per = full["input_ids"].shape[0] // jax.process_count()
  rows = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
  sh = S.batch_sharding(mesh)
  losses = []
  for i in range(2):
    batch = {k: jax.make_array_from_process_local_data(sh, np.asarray(v)[rows]) for k, v in full.items()}
    state, m = step(state, batch, jax.random.PRNGKey(i))
    losses.append(float(m["loss"]))
  # a checksum every process can compute: gather the (sharded) trainable leaves to host
  from jax.experimental import multihost_utils
  leaves = [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in jax.tree.leaves(state.trainable)]
  return {"losses": losses, "params": np.concatenate([x.ravel() for x in leaves]).tolist()}


def run_loop(workdir):
  # stage 2 here (the step comparison above covers stage 1's cross-process losses): it compiles faster
  from blip2_jax.train import loop
  from configs import stage2
  c = stage2.get_config("tiny")
  c.total_steps, c.export_hf, c.checkpoint_every = 4, False, 100
  c.mesh = (2, 2, 1)
  loop.train(c, workdir, max_steps=2)
  last = loop.train(c, workdir)
  return {"last": last}


if __name__ == "__main__":
  res = {}
  if mode in ("step", "both"):
    res["step"] = run_step()
  if mode in ("loop", "both"):
    res["loop"] = run_loop(os.path.join(os.path.dirname(out_path), "loopdir"))
  res.update(process_index=jax.process_index(), process_count=jax.process_count(), devices=jax.device_count())
  with open(out_path, "w") as f:
    json.dump(res, f)
