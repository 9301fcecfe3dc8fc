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
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import time
from typing import Any

import flax.linen as nn
import jax
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
  elif config.task == "vqa":
    kw["text_fn"] = batches.vqa_fields
  return pipeline.make_train_loader(
      source, global_batch_size=config.global_batch_size, image_size=config.model.image_size, seed=config.seed,
      max_txt_len=config.data.max_txt_len, max_words=config.data.max_words, worker_count=config.data.worker_count,
      augment=bool(config.data.get("augment", True)), **kw)


def is_remote(path: str) -> bool:
  """gs://, s3://, ... (written by orbax through its filesystem layer, not by os)."""
  return "://" in str(path)


def global_batch(batch: dict, sharding) -> dict:
  """Per-process numpy batch -> global jax arrays (each process holds its rows)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------
# checkpoints


_MIN_SLICE_BYTES = 1 << 20
_registered = []


def _small_arrays_unsliced(ocp) -> None:
  """Orbax's replica-parallel save slices every replicated array into one piece per replica, one
  dispatched op each: for the hundreds of biases and norm scales of a model (and their Adam
  moments) that costs seconds per save and buys nothing. Arrays whose per-replica piece is under
  1 MiB are written whole by one replica instead; large ones stay replica-parallel."""
  if _registered:
    return
  absl_log = logging.getLogger("absl")  # orbax warns that the override is an override, on every run
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=_MIN_SLICE_BYTES),
        override=True)
  finally:
    absl_log.setLevel(level)
  _registered.append(True)


class Checkpoints:
  """Orbax CheckpointManager over {state, data}: atomic saves, the last `keep` kept."""

  def __init__(self, directory: str, keep: int):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    _small_arrays_unsliced(ocp)
    self.directory = directory if is_remote(directory) else os.path.abspath(directory)
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


# Fine-tuning tasks that train/setup.py builds as another: the same model, tokenizers and LM loss;
# only their batches (train/batches.py) and metrics (train/evaluate.py) differ. "instruct" builds as
# "caption" so that a plain BLIP-2 checkpoint can take instructions too (in its LLM only; setup.build
# insists on an InstructBLIP for "instruct", whose Q-Former reads them as well).
SETUP_TASKS = {"vqa": "caption", "instruct": "caption"}


def build_setup(config, *, abstract: bool = False):
  """setup.build(config) for every task, the fine-tuning ones included (SETUP_TASKS); with
  `abstract`, setup.build_abstract (shapes only, nothing read)."""
  import ml_collections

  from blip2_jax.train import setup as setup_lib
  build = setup_lib.build_abstract if abstract else setup_lib.build
  if config.task not in SETUP_TASKS:
    return build(config)
  c = ml_collections.ConfigDict(config.to_dict())
  c.task = SETUP_TASKS[config.task]
  return build(c)


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
  from blip2_jax.train import optim, step as step_lib
  o = config.optim
  schedule = optim.lr_schedule(o.lr, warmup_steps=o.warmup_steps, total_steps=steps, min_lr=o.min_lr,
                               warmup_init=o.warmup_init)
  tx = make_optimizer(config, st, schedule)
  frozen_dtype = None if config.model.frozen_dtype in ("", "float32") else config.model.frozen_dtype
  shardings = step_lib.param_shardings(st.model, st.params, mesh)
  init = step_lib.abstract_train_state if abstract else step_lib.init_train_state
  state = init(st.params, list(config.frozen), tx, frozen_dtype=frozen_dtype, shardings=shardings)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(make_loss_fn(config, st), tx,
                                                                accum_steps=config.accum_steps, schedule=schedule),
                                       mesh, state)
  return StepParts(schedule, tx, state, train_step)


def make_optimizer(config, setup, schedule):
  """AdamW as config.optim says, with the ViT's layer-wise lr decay when optim.layer_decay < 1 and
  per-module lr multipliers from optim.lr_scales ((regex, factor), ...)."""
  from blip2_jax.train import optim
  o = config.optim
  return optim.make_optimizer(lr=schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                              clip_norm=o.clip_norm or None, layer_decay=float(o.get("layer_decay", 1.0)),
                              vit_layers=setup.model.config.vision.num_hidden_layers,
                              lr_scales=tuple(tuple(r) for r in o.get("lr_scales", ())))


class _Best:
  """The best `metric` seen so far and its export (WORKDIR/best); state in best.json, so a resumed run
  keeps competing against the earlier best."""

  def __init__(self, directory: str, metric: str):
    self.directory, self.metric = directory, metric
    self.value, self.step, self.baseline = None, None, None
    info = os.path.join(directory, "best.json")
    if metric and os.path.isfile(info):
      with open(info) as f:
        d = json.load(f)
      if d.get("metric") == metric:
        self.value, self.step, self.baseline = d.get("value"), d.get("step"), d.get("baseline")

  def update(self, step: int, metrics: dict, save) -> bool:
    """Exports with `save(path)` when metrics[metric] beats the best so far (ties keep the earlier)."""
    v = metrics.get(self.metric)
    if not self.metric or v is None or not np.isfinite(v) or (self.value is not None and v <= self.value):
      return False
    tmp = self.directory.rstrip("/") + ".tmp"
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
    save(tmp)
    with open(os.path.join(tmp, "best.json"), "w") as f:
      json.dump(dict(metric=self.metric, value=float(v), step=int(step), baseline=self.baseline), f)
    if os.path.isdir(self.directory):
      shutil.rmtree(self.directory)
    os.replace(tmp, self.directory)
    self.value, self.step = float(v), int(step)
    return True


def qformer_bos_id(setup) -> int:
  """The Q-Former tokenizer's bos ([DEC]); an abstract Setup has no tokenizer: the last vocabulary id,
  where LAVIS appends [DEC] (only a constant of the compiled step, so any valid id compiles the same)."""
  if setup.qformer_tokenizer is not None:
    return setup.qformer_tokenizer.bos_token_id
  return setup.model.config.qformer.vocab_size - 1


def make_loss_fn(config, setup):
  from blip2_jax.train import step as step_lib
  deterministic = not config.model.dropout
  if config.task in ("stage1", "retrieval"):
    return step_lib.stage1_loss_fn(setup.model, bos_token_id=qformer_bos_id(setup),
                                   deterministic=deterministic, label_smoothing=config.loss.label_smoothing,
                                   itc_full_gradient=config.loss.itc_full_gradient)
  return step_lib.stage2_loss_fn(setup.model, deterministic=deterministic)


class _Interrupt:
  """SIGTERM (preemption) -> a flag the loop checks after each step, so it saves and stops.
  `ignore_sigint`: Ctrl-C is ignored too (while the final checkpoint is written)."""

  def __init__(self, ignore_sigint: bool = False):
    self.requested = False
    self._signals = (signal.SIGTERM, signal.SIGINT) if ignore_sigint else (signal.SIGTERM,)
    self._old = {}

  def __enter__(self):
    for sig in self._signals:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, sig, _frame):
    self.requested = self.requested or sig == signal.SIGTERM

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


# Dense bf16 peak FLOP/s per device, for the MFU estimate (config.peak_tflops overrides).
PEAK_TFLOPS = {"TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5p": 459, "TPU v5": 459, "TPU v6 lite": 918,
               "TPU v6e": 918, "H100": 989, "H200": 989, "H800": 989, "A100": 312, "A800": 312, "L4": 121,
               "B200": 2250}


def peak_flops(config) -> float | None:
  """Peak bf16 FLOP/s of one device (None when unknown, e.g. on CPU)."""
  if config.get("peak_tflops"):
    return float(config.peak_tflops) * 1e12
  kind = jax.devices()[0].device_kind
  for name, tf in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return tf * 1e12
  return None


def step_flops(jitted, *args) -> float | None:
  """Matmul FLOPs of one train step, counted on its jaxpr (`blip2_jax.flops`: scanned layers times
  their count, which XLA's cost analysis misses): what runs, so frozen towers count forward-only."""
  from blip2_jax import flops
  try:
    return flops.count_flops(jitted, *args) or None
  except Exception as e:  # best-effort; training goes on without MFU
    log.warning("no FLOP estimate: %s", e)
    return None


class _Logger:
  """stdout lines + a progress bar (stderr) + metrics.jsonl + TensorBoard events, on process 0."""

  def __init__(self, workdir: str, total: int, start: int):
    self.on = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.bar = self.tb = None
    if not self.on:
      return
    try:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    except ImportError:
      pass
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:
      log.warning("tensorboardX is not installed: no TensorBoard events (pip install tensorboardX)")

  def print(self, msg: str):
    if self.on:
      (self.bar.write if self.bar is not None else print)(msg)
      sys.stdout.flush()

  def step(self, loss: float | None = None):
    if self.bar is not None:
      self.bar.update(1)
      if loss is not None:
        self.bar.set_postfix(loss=f"{loss:.4g}")

  def metrics(self, step: int, m: dict):
    if not self.on:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(dict(step=step, **m)) + "\n")
    if self.tb is not None:
      for k, v in m.items():
        if isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, step)
      self.tb.flush()

  def close(self):
    if self.bar is not None:
      self.bar.close()
    if self.tb is not None:
      self.tb.close()


class Preempted(Exception):
  """SIGTERM stopped the run after its checkpoint was saved; rerunning the same command resumes it.
  The command lines exit with 143 (128 + SIGTERM, what a shell reports for a process the signal
  killed), so a scheduler tells a preempted run from a finished one."""
  exit_status = 143


def train(config, workdir: str, *, max_steps: int | None = None, allow_config_change=()) -> dict:
  """Runs (or resumes) the training `config` describes in `workdir`; returns the last metrics.
  `max_steps` stops early (after that many steps of this call) with a checkpoint, for tests.
  A resume checks `config` against the one the run started with (train/run_config.py:
  ConfigMismatch naming the keys that differ, unless `allow_config_change` names them).
  A non-finite loss stops the run (FloatingPointError naming the step and the last good
  checkpoint); the bad state is not saved. SIGTERM saves and raises Preempted; Ctrl-C saves and
  re-raises KeyboardInterrupt."""
  from blip2_jax.train import batches, optim, run_config, step as step_lib

  # Checkpoints go to `workdir` itself (orbax writes gs:// and other remote paths); the logs and the
  # HF export are local files, so for a remote workdir they go to ./runs/<its last component>.
  local = workdir
  if is_remote(workdir):
    local = os.path.join("runs", workdir.rstrip("/").rsplit("/", 1)[-1])
    _print(f"workdir {workdir} is remote: checkpoints go there; metrics, TensorBoard events and the HF "
           f"export go to {os.path.abspath(local)}")
  os.makedirs(local, exist_ok=True)
  t0 = time.time()
  ckpt = Checkpoints(workdir.rstrip("/") + "/checkpoints", config.keep_checkpoints)
  latest = ckpt.latest_step()
  run_config.check_resume(workdir, config, allow_config_change, resuming=latest is not None)
  if jax.process_index() == 0:
    run_config.write(workdir, config)
  mesh = make_train_mesh(config)
  st = build_setup(config)
  source = make_source(config)
  steps = total_steps(config, len(source))
  parts = make_step(config, st, mesh, steps)
  state, train_step = parts.state, parts.train_step
  st.params = None  # the state holds them now (frozen ones possibly cast)
  shardings = step_lib.state_shardings(state)
  n_train = step_lib.count_params(state.trainable)
  n_frozen = step_lib.count_params(state.frozen)
  logger = _Logger(local, steps, 0)
  logger.print(f"{config.task}: {st.model.config.architecture}, {n_train / 1e6:.2f}M trainable + "
               f"{n_frozen / 1e6:.2f}M frozen parameters; mesh {dict(mesh.shape)}; {steps} steps of "
               f"{config.global_batch_size}")

  batch_sharding = step_lib.batch_sharding(mesh)
  to_model = batches.make_batch_fn(config, st)
  it = iter(make_loader(config, st, source))
  start = 0
  if latest is not None:
    # restore onto this run's mesh (the checkpoint may come from another topology)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    try:
      state, data_state = ckpt.restore(latest, abstract)
    except (ValueError, KeyError, TypeError) as e:  # another model or optimizer than the checkpoint's
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise run_config.ConfigMismatch(
          f"{ckpt.directory}/{latest} does not fit this config's train state (another model, frozen set or "
          f"optimizer?): {first}; use a new --workdir") from e
    it.set_state(data_state)
    start = latest
    logger.print(f"resumed from {ckpt.directory}/{latest}")
  if logger.bar is not None:
    logger.bar.n = start
  eval_set = None
  if config.get("eval_every", -1) >= 0:  # 0: only at the end; N: every N steps too
    from blip2_jax.train import evaluate as eval_lib
    eval_set = eval_lib.make_eval_set(config, st)

  best = _Best(os.path.join(local, "best"), str(config.get("best_metric", "") or ""))
  if best.metric and eval_set is not None and jax.process_count() > 1:
    logger.print("multi-process run: no evaluation inside training, so no best checkpoint (WORKDIR/hf is the "
                 "final model)")

  def run_eval(step_no):
    if eval_set is None:
      return {}
    params = optim.merge(state.trainable, state.frozen)
    res = eval_lib.evaluate(config, st, params, eval_set)
    scalars = {k: float(v) for k, v in res.items() if isinstance(v, (int, float, np.floating))}
    logger.print(f"eval at step {step_no}: " + " ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
    for ex in res.get("eval/examples", [])[:4]:
      logger.print(f"  {ex}")
    if step_no == 0:
      best.baseline = scalars.get(best.metric)  # the starting model: reported, never exported as "best"
    elif best.update(step_no, scalars, lambda path: export(st, state, path, quiet=True)):
      scalars["best"] = 1.0
      logger.print(f"new best {best.metric} {best.value:.4g} at step {step_no}: exported to {best.directory}")
    logger.metrics(step_no, scalars)
    return scalars

  rng = jax.random.PRNGKey(config.seed)  # step s uses fold_in(rng, s): a resumed run draws the same keys
  host_seed = np.random.SeedSequence([config.seed, jax.process_index()]).generate_state(2)
  last: dict = {}
  if start == 0 and config.get("eval_at_start", False):
    last.update(run_eval(0))
  skipped = 0
  stop = steps if max_steps is None else min(steps, start + max_steps)
  flops = peak = None
  done = start
  ctrl_c = False
  pending = None  # (step, loss array) of the previous step: checked one step late, so the host
  bad = False     # never waits for the device before dispatching the next step
  t_log, n_log = time.time(), 0

  def check(p):
    nonlocal bad
    if p is None:
      return None
    v = float(p[1])
    if not np.isfinite(v):
      bad = True
      good = ckpt.latest_step()
      raise FloatingPointError(
          f"loss is {v} at step {p[0]}; stopping without saving this state. The last good checkpoint is "
          + (f"{ckpt.directory}/{good}" if good is not None else "none (no checkpoint was saved yet)")
          + ": rerun to resume from it (with a lower optim.lr or optim.clip_norm, or check the data)")
    return v

  with _Interrupt() as interrupt:
    try:
      for step in range(start, stop):
        raw = next(it)
        skipped += int(raw.pop("num_skipped", 0))
        batch = global_batch(to_model(raw, np.random.default_rng([*host_seed, step])), batch_sharding)
        key = jax.random.fold_in(rng, step)
        if flops is None and step == start:
          with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
            flops, peak = step_flops(train_step.jitted, state, batch, key), peak_flops(config)
        state, m = train_step(state, batch, key)
        loss = check(pending)
        pending = (step + 1, m["loss"])
        done, n_log = step + 1, n_log + 1
        logger.step(loss)
        if done % config.log_every == 0 or done == stop:
          check(pending)
          mh = {k: float(v) for k, v in jax.device_get(m).items()}
          dt = time.time() - t_log
          mh["images_per_s"] = n_log * config.global_batch_size / max(dt, 1e-9)
          if flops:
            achieved = flops * n_log / max(dt, 1e-9) / jax.device_count()
            mh["tflops_per_device"] = achieved / 1e12
            if peak:
              mh["mfu"] = achieved / peak
          t_log, n_log = time.time(), 0
          last = dict(step=done, **mh, skipped_images=skipped)
          logger.print(" ".join([f"step {done}/{steps}"] + [f"{k} {v:.4g}" for k, v in mh.items()]
                                + [f"skipped {skipped}"]))
          logger.metrics(done, dict(mh, skipped_images=skipped))
        if config.get("eval_every", 0) > 0 and done % config.eval_every == 0 and done != stop:
          last.update(run_eval(done))
        if done % config.checkpoint_every == 0 and done != stop:
          ckpt.save(done, state, it.get_state())
        if interrupt.requested:
          logger.print(f"SIGTERM: saving step {done} and stopping")
          stop = done
          break
      check(pending)
    except KeyboardInterrupt:
      logger.print(f"interrupted: saving step {done}")
      stop, ctrl_c = done, True
    finally:
      with _Interrupt(ignore_sigint=True):  # a second Ctrl-C must not cut the save short
        if not bad and done > start and ckpt.latest_step() != done:
          ckpt.save(done, state, it.get_state(), force=True)
        ckpt.wait()
        ckpt.close()
        logger.close()
  if interrupt.requested or ctrl_c:
    saved = ckpt.latest_step()
    where = f"saved {ckpt.directory}/{saved}" if saved is not None else "no checkpoint yet (stopped before a step)"
    how = "interrupted (Ctrl-C)" if ctrl_c else "preempted (SIGTERM)"
    msg = f"{how} at step {done}/{steps}: {where}; rerun the same command to resume"
    raise KeyboardInterrupt(msg) if ctrl_c else Preempted(msg)
  if stop == steps:
    last.update(run_eval(stop))
    if config.export_hf:
      export(st, state, os.path.join(local, "hf"))
    if best.value is not None:
      base = "" if best.baseline is None else f" (before training: {best.baseline:.4g})"
      _print(f"best {best.metric} {best.value:.4g}{base} at step {best.step}: {best.directory}")
      last.update({"best/value": best.value, "best/step": best.step})
  _print(f"done: step {stop}/{steps} in {time.time() - t0:.1f}s")
  return last


def export(st, state, path: str, *, quiet: bool = False) -> None:
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
  if not quiet:
    _print(f"exported the trained model to {path}")


def _print(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)
