"""The training loop: data -> sharded train step -> logs and checkpoints, resumable.

    python -m blip2_jax.train --config configs/stage1.py:tiny --workdir /tmp/run

Checkpoints (orbax CheckpointManager under WORKDIR/checkpoints): the train state (params,
optimizer state, step) and the data iterator's state, saved together every
`checkpoint_every` steps, at the end, and when the run is interrupted (Ctrl-C / SIGTERM); orbax
writes to a temporary directory and renames it when complete, and keeps the last
`keep_checkpoints`, so a crash mid-save never loses the previous checkpoint. A rerun with the same
workdir resumes from the latest one, with exactly the batches that would have come next.
Metrics go to stdout, WORKDIR/metrics.jsonl and WORKDIR/tb; at the end the trained model is exported
as a HF directory (WORKDIR/hf; stage-1 tasks add qformer_lm_head.safetensors) unless `export_hf` is
off. A remote WORKDIR (gs://...) holds the checkpoints; logs and the export then go to ./runs/<name>.

Evaluation (train/evaluate.py): every `eval_every` steps (fine-tuning: once per epoch), at the end,
and before the first step with `eval_at_start`. With `best_metric` set (e.g. "eval/cider"), every
evaluation after training steps that beats the best so far exports the model to WORKDIR/best (HF
layout, written to a temporary directory and renamed, with best.json: step, metric, value, baseline);
a resumed run reads best.json and keeps competing against it. WORKDIR/hf stays the final model.

The pieces: train/checkpointing.py (orbax, SIGTERM), train/reporting.py (logs, MFU), train/export.py
(HF export, best checkpoint), train/tasks.py (what differs between tasks), train/step.py (the jitted
step), train/setup.py (model and tokenizers), train/batches.py and train/evaluate.py.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from blip2_jax.core import sharding as shd
from blip2_jax.data import capfilt_shards, pipeline, sources, synthetic
from blip2_jax.train import batches, checkpointing, optim, reporting, run_config, tasks
from blip2_jax.train import evaluate as eval_lib
from blip2_jax.train import export as export_lib
from blip2_jax.train import setup as setup_lib
from blip2_jax.train import step as step_lib
from blip2_jax.train.reporting import peak_flops, print0, step_flops

log = logging.getLogger("blip2_jax.train")


# ----------------------------------------------------------------------------------------
# data


def make_source(config):
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
    # a CapFilt output directory reads its complete shards; a record's caption list gives one per step
    return sources.ArrayRecordSource(capfilt_shards.array_record_paths(d.array_record), expand_captions=False)
  if d.source == "tfds":
    if not d.tfds_name:
      raise ValueError("data.source='tfds' needs data.tfds_name")
    return sources.TfdsSource(d.tfds_name, split=d.tfds_split, data_dir=d.tfds_data_dir)
  raise ValueError(f"data.source {d.source!r}: choose annotations, array_record, tfds or shapes")


def make_loader(config, setup, source):
  task = tasks.get(config.task)
  kw: dict[str, Any] = {}
  if task.stage1:  # the pipeline tokenises the captions for the Q-Former
    kw["tokenizer"] = setup.qformer_tokenizer
  elif task.text_fn is not None:
    kw["text_fn"] = task.text_fn
  return pipeline.make_train_loader(
      source, global_batch_size=config.global_batch_size, image_size=config.model.image_size, seed=config.seed,
      max_txt_len=config.data.max_txt_len, max_words=config.data.max_words, worker_count=config.data.worker_count,
      augment=bool(config.data.get("augment", True)), **kw)


def global_batch(batch: dict, sharding) -> dict:
  """Per-process numpy batch -> global jax arrays (each process holds its rows)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


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


def build_setup(config, *, abstract: bool = False):
  """setup.build(config); with `abstract`, setup.build_abstract (shapes only, nothing read)."""
  return (setup_lib.build_abstract if abstract else setup_lib.build)(config)


def make_train_mesh(config, devices=None):
  """`config.mesh` over `devices` (default: every device), refusing a global batch that does not
  split evenly over its data x fsdp devices."""
  mesh = shd.make_mesh(tuple(config.mesh), devices=devices)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]  # the batch is split over both
  if config.global_batch_size % dp:
    raise ValueError(f"global_batch_size {config.global_batch_size} does not split evenly over the {dp} "
                     f"data-parallel devices of mesh {dict(mesh.shape)} (data x fsdp)")
  return mesh


@dataclasses.dataclass
class StepParts:
  """The train step of a recipe as `make_step` builds it (for `train()` and the AOT compiler alike)."""
  schedule: Any
  tx: Any           # the optax optimizer
  state: Any        # a placed TrainState, or (abstract) one of ShapeDtypeStructs with their shardings
  train_step: Any   # step_lib.jit_train_step(...): call(state, batch, rng), `.jitted` to lower


def make_step(config, st, mesh, steps: int, *, abstract: bool = False) -> StepParts:
  """Schedule, optimizer, train state and jitted train step of `config` over `mesh`; `st` from
  build_setup(config, abstract=abstract). Abstract: the state holds ShapeDtypeStructs (nothing is
  allocated), so `train_step.jitted.lower(state, batch, rng)` compiles what train() would run."""
  o = config.optim
  schedule = optim.lr_schedule(o.lr, warmup_steps=o.warmup_steps, total_steps=steps, min_lr=o.min_lr,
                               warmup_init=o.warmup_init)
  tx = make_optimizer(config, st, schedule)
  frozen_dtype = None if config.model.frozen_dtype in ("", "float32") else config.model.frozen_dtype
  shardings = step_lib.tree_shardings(st.model, st.params, mesh)
  init = step_lib.abstract_train_state if abstract else step_lib.init_train_state
  state = init(st.params, list(config.frozen), tx, frozen_dtype=frozen_dtype, shardings=shardings)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(make_loss_fn(config, st), tx,
                                                                accum_steps=config.accum_steps, schedule=schedule),
                                       mesh, state)
  return StepParts(schedule, tx, state, train_step)


def make_optimizer(config, setup, schedule):
  """AdamW as config.optim says, with the ViT's layer-wise lr decay when optim.layer_decay < 1 and
  per-module lr multipliers from optim.lr_scales ((regex, factor), ...)."""
  o = config.optim
  return optim.make_optimizer(lr=schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                              clip_norm=o.clip_norm or None, layer_decay=float(o.get("layer_decay", 1.0)),
                              vit_layers=setup.model.config.vision.num_hidden_layers,
                              lr_scales=tuple(tuple(r) for r in o.get("lr_scales", ())))


def qformer_bos_id(setup) -> int:
  """The Q-Former tokenizer's bos ([DEC]); an abstract Setup has no tokenizer: the last vocabulary id,
  where LAVIS appends [DEC] (only a constant of the compiled step, so any valid id compiles the same)."""
  if setup.qformer_tokenizer is not None:
    return setup.qformer_tokenizer.bos_token_id
  return setup.model.config.qformer.vocab_size - 1


def make_loss_fn(config, setup):
  deterministic = not config.model.dropout
  if tasks.get(config.task).stage1:
    return step_lib.stage1_loss_fn(setup.model, bos_token_id=qformer_bos_id(setup),
                                   deterministic=deterministic, label_smoothing=config.loss.label_smoothing,
                                   itc_full_gradient=config.loss.itc_full_gradient)
  return step_lib.stage2_loss_fn(setup.model, deterministic=deterministic)


def train(config, workdir: str, *, max_steps: int | None = None, allow_config_change=()) -> dict:
  """Runs (or resumes) the training `config` describes in `workdir`; returns the last metrics.
  `max_steps` stops early (after that many steps of this call) with a checkpoint, for tests.
  A resume checks `config` against the one the run started with (train/run_config.py:
  ConfigMismatch naming the keys that differ, unless `allow_config_change` names them).
  A non-finite loss stops the run (FloatingPointError naming the step and the last good
  checkpoint); the bad state is not saved. SIGTERM saves and raises Preempted; Ctrl-C saves and
  re-raises KeyboardInterrupt."""
  t0 = time.time()
  run = _Run(config, workdir, allow_config_change)
  if run.start == 0 and config.get("eval_at_start", False):
    run.evaluate(0)
  stop = run.steps if max_steps is None else min(run.steps, run.start + max_steps)
  stopped_by = None
  with checkpointing.Interrupt() as interrupt:
    try:
      stopped_by = run.steps_until(stop, interrupt)
    except KeyboardInterrupt:
      run.logger.print(f"interrupted: saving step {run.done}")
      stopped_by = "interrupted (Ctrl-C)"
    finally:
      run.close()  # saves the last step unless the loss went bad
  if stopped_by:
    saved = run.ckpt.latest_step()
    where = f"saved {run.ckpt.directory}/{saved}" if saved is not None else "no checkpoint yet (stopped before a step)"
    msg = f"{stopped_by} at step {run.done}/{run.steps}: {where}; rerun the same command to resume"
    raise KeyboardInterrupt(msg) if "Ctrl-C" in stopped_by else checkpointing.Preempted(msg)
  if run.done == run.steps:
    run.finish()
  print0(f"done: step {run.done}/{run.steps} in {time.time() - t0:.1f}s")
  return run.last


class _Run:
  """One call of train(): the workdir, model, state, data and reporting, and the steps between."""

  def __init__(self, config, workdir: str, allow_config_change):
    self.config = config
    # Checkpoints go to `workdir` itself (orbax writes gs:// and other remote paths); the logs and the
    # HF export are local files, so for a remote workdir they go to ./runs/<its last component>.
    self.local = workdir
    if checkpointing.is_remote(workdir):
      self.local = os.path.join("runs", workdir.rstrip("/").rsplit("/", 1)[-1])
      print0(f"workdir {workdir} is remote: checkpoints go there; metrics, TensorBoard events and the HF "
             f"export go to {os.path.abspath(self.local)}")
    os.makedirs(self.local, exist_ok=True)
    self.ckpt = checkpointing.Checkpoints(workdir.rstrip("/") + "/checkpoints", config.keep_checkpoints)
    latest = self.ckpt.latest_step()
    run_config.check_resume(workdir, config, allow_config_change, resuming=latest is not None)
    if jax.process_index() == 0:
      run_config.write(workdir, config)
    self.mesh = make_train_mesh(config)
    self.st = build_setup(config)
    source = make_source(config)
    self.steps = total_steps(config, len(source))
    parts = make_step(config, self.st, self.mesh, self.steps)
    self.state, self.train_step = parts.state, parts.train_step
    self.st.params = None  # the state holds them now (frozen ones possibly cast)
    self.logger = reporting.Logger(self.local, self.steps, 0)
    self.logger.print(
        f"{config.task}: {self.st.model.config.architecture}, {step_lib.count_params(self.state.trainable) / 1e6:.2f}M "
        f"trainable + {step_lib.count_params(self.state.frozen) / 1e6:.2f}M frozen parameters; mesh "
        f"{dict(self.mesh.shape)}; {self.steps} steps of {config.global_batch_size}")
    self.to_model = batches.make_batch_fn(config, self.st)
    self.batch_sharding = step_lib.batch_sharding(self.mesh)
    self.it = iter(make_loader(config, self.st, source))
    self.start = self.done = 0
    if latest is not None:
      self._restore(latest)
    if self.logger.bar is not None:
      self.logger.bar.n = self.start
    self.eval_set = None
    if config.get("eval_every", -1) >= 0:  # 0: only at the end; N: every N steps too
      self.eval_set = eval_lib.make_eval_set(config, self.st)
    self.best = export_lib.Best(os.path.join(self.local, "best"), str(config.get("best_metric", "") or ""))
    if self.best.metric and self.eval_set is not None and jax.process_count() > 1:
      self.logger.print("multi-process run: no evaluation inside training, so no best checkpoint (WORKDIR/hf is "
                        "the final model)")
    self.last: dict = {}
    self.bad = False  # a non-finite loss: that state is never saved

  def _restore(self, latest: int) -> None:
    """Onto this run's mesh (the checkpoint may come from another topology)."""
    shardings = step_lib.state_shardings(self.state)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state, shardings)
    try:
      self.state, data_state = self.ckpt.restore(latest, abstract)
    except (ValueError, KeyError, TypeError) as e:  # another model or optimizer than the checkpoint's
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise run_config.ConfigMismatch(
          f"{self.ckpt.directory}/{latest} does not fit this config's train state (another model, frozen set or "
          f"optimizer?): {first}; use a new --workdir") from e
    self.it.set_state(data_state)
    self.start = self.done = latest
    self.logger.print(f"resumed from {self.ckpt.directory}/{latest}")

  def evaluate(self, step_no: int) -> None:
    if self.eval_set is None:
      return
    params = optim.merge(self.state.trainable, self.state.frozen)
    res = eval_lib.evaluate(self.config, self.st, params, self.eval_set)
    scalars = {k: float(v) for k, v in res.items() if isinstance(v, (int, float, np.floating))}
    self.logger.print(f"eval at step {step_no}: " + " ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
    for ex in res.get("eval/examples", [])[:4]:
      self.logger.print(f"  {ex}")
    best = self.best
    if step_no == 0:
      best.baseline = scalars.get(best.metric)  # the starting model: reported, never exported as "best"
    elif best.update(step_no, scalars, lambda path: export_lib.export(self.st, self.state, path, quiet=True)):
      scalars["best"] = 1.0
      self.logger.print(f"new best {best.metric} {best.value:.4g} at step {step_no}: exported to {best.directory}")
    self.logger.metrics(step_no, scalars)
    self.last.update(scalars)

  def _check(self, pending) -> float | None:
    """The loss of a finished step, or FloatingPointError naming the last good checkpoint."""
    if pending is None:
      return None
    v = float(pending[1])
    if not np.isfinite(v):
      self.bad = True
      good = self.ckpt.latest_step()
      raise FloatingPointError(
          f"loss is {v} at step {pending[0]}; stopping without saving this state. The last good checkpoint is "
          + (f"{self.ckpt.directory}/{good}" if good is not None else "none (no checkpoint was saved yet)")
          + ": rerun to resume from it (with a lower optim.lr or optim.clip_norm, or check the data)")
    return v

  def steps_until(self, stop: int, interrupt) -> str | None:
    """Trains up to step `stop`; "preempted (SIGTERM)" when a SIGTERM stopped it early, else None."""
    config = self.config
    rng = jax.random.PRNGKey(config.seed)  # step s uses fold_in(rng, s): a resumed run draws the same keys
    host_seed = np.random.SeedSequence([config.seed, jax.process_index()]).generate_state(2)
    skipped, flops, peak = 0, None, None
    pending = None  # (step, loss array) of the previous step: checked one step late, so the host
    t_log, n_log = time.time(), 0  # never waits for the device before dispatching the next step
    for step in range(self.start, stop):
      raw = next(self.it)
      skipped += int(raw.pop("num_skipped", 0))
      batch = global_batch(self.to_model(raw, np.random.default_rng([*host_seed, step])), self.batch_sharding)
      key = jax.random.fold_in(rng, step)
      if step == self.start:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
          flops, peak = step_flops(self.train_step.jitted, self.state, batch, key), peak_flops(config)
      self.state, m = self.train_step(self.state, batch, key)
      loss = self._check(pending)
      pending = (step + 1, m["loss"])
      self.done, n_log = step + 1, n_log + 1
      self.logger.step(loss)
      done = self.done
      if done % config.log_every == 0 or done == stop:
        self._check(pending)
        mh = {k: float(v) for k, v in jax.device_get(m).items()}
        dt = max(time.time() - t_log, 1e-9)
        mh["images_per_s"] = n_log * config.global_batch_size / dt
        if flops:
          mh["tflops_per_device"] = flops * n_log / dt / jax.device_count() / 1e12
          if peak:
            mh["mfu"] = mh["tflops_per_device"] * 1e12 / peak
        t_log, n_log = time.time(), 0
        self.last = dict(step=done, **mh, skipped_images=skipped)
        self.logger.print(" ".join([f"step {done}/{self.steps}"] + [f"{k} {v:.4g}" for k, v in mh.items()]
                                   + [f"skipped {skipped}"]))
        self.logger.metrics(done, dict(mh, skipped_images=skipped))
      if config.get("eval_every", 0) > 0 and done % config.eval_every == 0 and done != stop:
        self.evaluate(done)
      if done % config.checkpoint_every == 0 and done != stop:
        self.ckpt.save(done, self.state, self.it.get_state())
      if interrupt.requested:
        self._check(pending)
        self.logger.print(f"SIGTERM: saving step {done} and stopping")
        return "preempted (SIGTERM)"
    self._check(pending)
    return None

  def close(self) -> None:
    """Saves the last step (unless its loss went bad), waits for the writes, closes the logs."""
    with checkpointing.Interrupt(ignore_sigint=True):  # a second Ctrl-C must not cut the save short
      if not self.bad and self.done > self.start and self.ckpt.latest_step() != self.done:
        self.ckpt.save(self.done, self.state, self.it.get_state(), force=True)
      self.ckpt.wait()
      self.ckpt.close()
      self.logger.close()

  def finish(self) -> None:
    """The end of the schedule: the final evaluation, the HF export, the best checkpoint's line."""
    self.evaluate(self.done)
    if self.config.export_hf:
      export_lib.export(self.st, self.state, os.path.join(self.local, "hf"))
    best = self.best
    if best.value is not None:
      base = "" if best.baseline is None else f" (before training: {best.baseline:.4g})"
      print0(f"best {best.metric} {best.value:.4g}{base} at step {best.step}: {best.directory}")
      self.last.update({"best/value": best.value, "best/step": best.step})
