"""The training loop: data -> sharded train step -> logs and checkpoints, resumable.

    python -m blip2_jax.train --config configs/stage1.py:tiny --workdir /tmp/run

Checkpoints (orbax CheckpointManager under WORKDIR/checkpoints): the train state (params,
optimizer state, step) and the data iterator's state, saved together every
`checkpoint_every` steps, at the end, and when the run is interrupted (Ctrl-C / SIGTERM); orbax
writes to a temporary directory and renames it when complete, and keeps the last
`keep_checkpoints`, so a crash mid-save never loses the previous checkpoint. A rerun with the same
workdir resumes from the latest one, with exactly the batches that would have come next.
Metrics go to stdout and WORKDIR/metrics.jsonl; at the end the trained model is exported as a HF
directory (WORKDIR/hf; stage-1 tasks add qformer_lm_head.safetensors) unless `export_hf` is off.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax import sharding as shd

log = logging.getLogger("blip2_jax.train")


# ----------------------------------------------------------------------------------------
# data


def make_source(config):
  from blip2_jax.data import sources, synthetic
  d = config.data
  if d.source == "shapes":
    return synthetic.ShapesSource(d.num_records or 1024, split="train", seed=config.seed,
                                  size=max(64, int(config.model.image_size)))
  if d.source == "annotations":
    if not d.annotations:
      raise ValueError("data.source='annotations' needs data.annotations (a LAVIS / COCO json or JSONL file)")
    return sources.AnnotationSource.from_file(d.annotations, d.images_dir or None)
  if d.source == "array_record":
    if not d.array_record:
      raise ValueError("data.source='array_record' needs data.array_record (shard prefix or paths)")
    return sources.ArrayRecordSource(d.array_record, expand_captions=False)
  if d.source == "tfds":
    if not d.tfds_name:
      raise ValueError("data.source='tfds' needs data.tfds_name")
    return sources.TfdsSource(d.tfds_name, split=d.tfds_split, data_dir=d.tfds_data_dir)
  raise ValueError(f"data.source {d.source!r}: choose annotations, array_record, tfds or shapes")


def make_loader(config, setup, source):
  from blip2_jax.data import pipeline
  from blip2_jax.train import batches
  kw: dict[str, Any] = {}
  if config.task in ("stage1", "retrieval"):
    kw["tokenizer"] = setup.qformer_tokenizer
  elif config.task == "instruct":
    kw["text_fn"] = batches.instruct_fields
  return pipeline.make_train_loader(
      source, global_batch_size=config.global_batch_size, image_size=config.model.image_size, seed=config.seed,
      max_txt_len=config.data.max_txt_len, max_words=config.data.max_words, worker_count=config.data.worker_count,
      **kw)


def global_batch(batch: dict, sharding) -> dict:
  """Per-process numpy batch -> global jax arrays (each process holds its rows)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------
# checkpoints


class Checkpoints:
  """Orbax CheckpointManager over {state, data}: atomic saves, the last `keep` kept."""

  def __init__(self, directory: str, keep: int):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True),
        item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> None:
    ocp = self._ocp
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, abstract_state):
    ocp = self._ocp
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


# ----------------------------------------------------------------------------------------
# the loop


def total_steps(config, num_records: int) -> int:
  if config.total_steps:
    return int(config.total_steps)
  if not config.num_epochs:
    raise ValueError("set total_steps or num_epochs")
  steps = int(config.num_epochs) * (num_records // int(config.global_batch_size))
  if steps < 1:
    raise ValueError(f"{num_records} records give no full batch of {config.global_batch_size}")
  return steps


def make_loss_fn(config, setup):
  from blip2_jax.train import step as step_lib
  deterministic = not config.model.dropout
  if config.task in ("stage1", "retrieval"):
    return step_lib.stage1_loss_fn(setup.model, bos_token_id=setup.qformer_tokenizer.bos_token_id,
                                   deterministic=deterministic, label_smoothing=config.loss.label_smoothing,
                                   itc_full_gradient=config.loss.itc_full_gradient)
  return step_lib.stage2_loss_fn(setup.model, deterministic=deterministic)


class _Interrupt:
  """SIGTERM (preemption) -> a flag the loop checks after each step, so it saves and stops."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, *_):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def train(config, workdir: str, *, max_steps: int | None = None) -> dict:
  """Runs (or resumes) the training `config` describes in `workdir`; returns the last metrics.
  `max_steps` stops early (after that many steps of this call) with a checkpoint, for tests."""
  from blip2_jax.train import batches, optim, setup as setup_lib, step as step_lib

  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  mesh = shd.make_mesh(tuple(config.mesh))
  st = setup_lib.build(config)
  source = make_source(config)
  steps = total_steps(config, len(source))
  o = config.optim
  schedule = optim.lr_schedule(o.lr, warmup_steps=o.warmup_steps, total_steps=steps, min_lr=o.min_lr,
                               warmup_init=o.warmup_init)
  tx = optim.make_optimizer(lr=schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                            clip_norm=o.clip_norm or None)
  frozen_dtype = None if config.model.frozen_dtype in ("", "float32") else config.model.frozen_dtype
  state = step_lib.init_train_state(st.params, list(config.frozen), tx, frozen_dtype=frozen_dtype,
                                    shardings=step_lib.param_shardings(st.model, st.params, mesh))
  st.params = None  # the state holds them now (frozen ones possibly cast)
  shardings = step_lib.state_shardings(state)
  n_train = setup_lib.count_params(state.trainable)
  n_frozen = setup_lib.count_params(state.frozen)
  _print(f"{config.task}: {st.model.config.architecture}, {n_train / 1e6:.2f}M trainable + {n_frozen / 1e6:.2f}M "
         f"frozen parameters; mesh {dict(mesh.shape)}; {steps} steps of {config.global_batch_size}")

  train_step = step_lib.jit_train_step(step_lib.make_train_step(make_loss_fn(config, st), tx,
                                                                accum_steps=config.accum_steps, schedule=schedule),
                                       mesh, state)
  batch_sharding = step_lib.batch_sharding(mesh)
  to_model = batches.make_batch_fn(config, st)
  it = iter(make_loader(config, st, source))
  ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  start = 0
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    state, data_state = ckpt.restore(latest, abstract)
    it.set_state(data_state)
    start = latest
    _print(f"resumed from {ckpt.directory}/{latest}")

  rng = jax.random.PRNGKey(config.seed)
  host_rng_seed = np.random.SeedSequence([config.seed, jax.process_index()])
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  last: dict = {}
  skipped = 0
  stop = steps if max_steps is None else min(steps, start + max_steps)
  step = start
  t_log = time.time()
  with _Interrupt() as interrupt:
    try:
      for step in range(start, stop):
        raw = next(it)
        skipped += int(raw.pop("num_skipped", 0))
        batch = to_model(raw, np.random.default_rng([*host_rng_seed.generate_state(2), step]))
        state, m = train_step(state, global_batch(batch, batch_sharding), jax.random.fold_in(rng, step))
        done = step + 1
        if done % config.log_every == 0 or done == stop:
          m = {k: float(v) for k, v in jax.device_get(m).items()}
          dt = time.time() - t_log
          t_log = time.time()
          last = dict(step=done, **m, skipped_images=skipped, seconds=round(dt, 3))
          _print(" ".join([f"step {done}/{steps}"] + [f"{k} {v:.4g}" for k, v in m.items()]
                          + [f"skipped {skipped}", f"{dt:.1f}s"]))
          if jax.process_index() == 0:
            with open(metrics_path, "a") as f:
              f.write(json.dumps(last) + "\n")
        if done % config.checkpoint_every == 0 and done != stop:
          ckpt.save(done, state, it.get_state())
        if interrupt.requested:
          _print(f"SIGTERM: saving step {done} and stopping")
          stop = done
          break
    except KeyboardInterrupt:
      stop = step  # the step in flight did not finish: save the last completed one
      _print(f"interrupted: saving step {stop}")
      raise
    finally:
      if stop > start and ckpt.latest_step() != stop:
        ckpt.save(stop, state, it.get_state(), force=True)
      ckpt.wait()
      ckpt.close()
  if stop == steps and config.export_hf:
    export(st, state, os.path.join(workdir, "hf"))
  _print(f"done: step {stop}/{steps} in {time.time() - t0:.1f}s")
  return last


def export(st, state, path: str) -> None:
  """The trained parameters as a HF directory (+ qformer_lm_head.safetensors, tokenizers)."""
  import blip2_jax
  from blip2_jax.train import optim
  from blip2_jax.weights import hf
  tree = jax.device_get(optim.merge(state.trainable, state.frozen))
  blip2_jax.save_pretrained(st.model, tree["model"], path)
  if "qformer_lm_head" in tree:
    hf.save_qformer_head(path, st.model, tree["qformer_lm_head"], tree.get("temp"))
  if st.llm_tokenizer is not None:
    st.llm_tokenizer.save_pretrained(path)
  if st.qformer_tokenizer is not None:
    st.qformer_tokenizer.save_pretrained(path if st.llm_tokenizer is None else os.path.join(path, "qformer_tokenizer"))
  _print(f"exported the trained model to {path}")


def _print(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)
