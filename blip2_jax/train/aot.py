"""Ahead-of-time compilation of a recipe's real train step for a TPU slice that is not attached
(or for this host's own devices).

    python -m blip2_jax.aot --config configs/stage1.py:vit=g --topology v5p-128
    python -m blip2_jax.aot --config configs/stage1.py:vit=g --topology gpu --global-batch 64   # on a GPU host

`compile_recipe` builds the step exactly as `python -m blip2_jax.train` does (train/loop.py
`make_train_mesh`, `build_setup`, `make_step`), but from abstract parameters (train/setup.py
`build_abstract`: the released model's shapes, nothing read) and an abstract batch, over the
compile-only devices libtpu describes for the slice; then XLA's TPU compiler runs on this host.
`--topology gpu` / `local` compiles for the devices attached here instead (a GPU's own compiler),
with the chip figures of their kind, so the estimate can be checked against a measured step.
From the compiled program it reports per device: memory against the chip's HBM, matmul FLOPs
(`blip2_jax.core.flops`, scanned layers counted), every collective (`core.hlo.collectives`), the HBM bytes
every op reads and writes (`core.hlo.op_costs`), the largest replicated arrays, XLA's
involuntary-rematerialisation warnings, and a roofline step time from the published chip figures
(`core.hardware`):
  ops         = sum over the optimized program's ops (loop bodies times their trip count) of
                max(the op's matmul FLOPs at peak bf16 FLOP/s, its HBM bytes at HBM bandwidth),
                plus any matmul FLOPs of the jaxpr count that the HLO count misses, at peak
  collectives = every collective's bytes at ICI bandwidth (core.hlo)
  step        = ops + collectives (not overlapped) or max(ops, collectives) (overlapped)
MFU = model FLOPs / (step x peak); days follow from the recipe's steps. Still optimistic: each op is
taken to overlap its own memory and matmul work perfectly, and the chips' peak rates to be reached.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile

import numpy as np

from blip2_jax.core import flops, hardware, hlo
from blip2_jax.core import sharding as shd
from blip2_jax.models import blip2
from blip2_jax.train import batches, loop, optim
from blip2_jax.train import step as step_lib

# The paper's own runs (BLIP-2, section 4): one 16 x A100-40G machine.
PAPER = {"stage1": dict(days=6, steps=250_000), "stage2": dict(days=3, steps=80_000)}
PAPER_GPUS = 16


class DoesNotFit(Exception):
  """The step needs more HBM per device than the chip has."""


@dataclasses.dataclass
class Report:
  recipe: str
  topology: hardware.Topology
  mesh: dict
  global_batch: int
  recipe_batch: int             # the recipe's own batch (before --global-batch)
  remat: str
  steps: int
  memory: dict                  # bytes per device: argument, output, alias, temp, peak, hbm
  hw_flops: float               # per step, whole slice, as compiled (remat recomputation included)
  model_flops: float            # per step, whole slice, without remat recomputation
  collectives: list
  replicated: list              # (path, shape, dtype, bytes per device), largest first
  replicated_bytes: int
  involuntary: list             # XLA's "Involuntary full rematerialization" lines (shortened)
  task: str = ""
  notes: list = dataclasses.field(default_factory=list)
  ops: dict = dataclasses.field(default_factory=dict)  # per device: op_roofline() of the compiled program
  measured: dict = dataclasses.field(default_factory=dict)  # run_steps() on local devices: step_s, peak, ...

  @property
  def devices(self) -> int:
    return self.topology.chips

  @property
  def fits(self) -> bool:
    return self.memory["peak"] <= self.memory["hbm"]

  def comm_seconds(self) -> float:
    link = self.topology.chip.link_bw
    return sum(c.count * c.traffic() / (max(c.phys_dims, 1) * link) for c in self.collectives)

  def roofline(self) -> dict:
    """Step time estimates in seconds (see the module docstring), MFU and days for each."""
    chip = self.topology.chip
    compute = self.hw_flops / self.devices / chip.bf16_flops
    comm = self.comm_seconds()
    ops = self.ops.get("op_s", compute)
    out = dict(compute_s=compute, memory_s=self.ops.get("hbm_bytes", 0.0) / chip.hbm_bw, ops_s=ops, comm_s=comm,
               overlapped_s=max(ops, comm), serial_s=ops + comm)
    for k in ("overlapped", "serial"):
      t = out[f"{k}_s"]
      out[f"mfu_{k}"] = self.model_flops / self.devices / (t * chip.bf16_flops) if t else 0.0
      out[f"days_{k}"] = self.steps * t / 86400 if self.steps else None
    return out

  def paper(self) -> dict | None:
    """The paper's 16 x A100 run of this stage and the MFU it implies for these FLOPs (at the
    recipe's batch, the paper's)."""
    p = PAPER.get(self.task)
    if p is None:
      return None
    flops = self.model_flops * self.recipe_batch / self.global_batch * p["steps"]
    mfu = flops / (PAPER_GPUS * hardware.CHIPS["a100"].bf16_flops * p["days"] * 86400)
    return dict(days=p["days"], steps=p["steps"], mfu_at_least=mfu)

  def to_dict(self) -> dict:
    return dict(recipe=self.recipe, topology=self.topology.name, libtpu_topology=self.topology.libtpu_name,
                chip=self.topology.chip.name, peak_flops=self.topology.chip.bf16_flops, devices=self.devices,
                mesh=self.mesh, global_batch=self.global_batch,
                remat=self.remat, steps=self.steps, memory=self.memory, fits=self.fits, hw_flops=self.hw_flops,
                model_flops=self.model_flops, roofline=self.roofline(), paper=self.paper(),
                collectives=[dataclasses.asdict(c) for c in self.collectives],
                collective_summary=hlo.summarize(self.collectives), replicated=self.replicated,
                replicated_bytes=self.replicated_bytes, involuntary=self.involuntary, notes=self.notes, ops=self.ops,
                measured=self.measured)


@contextlib.contextmanager
def captured_stderr(sink: list):
  """Collects what C++ code (libtpu, XLA's logging) writes to fd 2 into `sink` (one string)."""
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    saved = os.dup(2)
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      sink.append(tmp.read().decode("utf-8", "replace"))


def _involuntary(log: str) -> list[str]:
  """XLA's 'Involuntary full rematerialization' warnings, one short line each (op and where)."""
  out = []
  for line in log.splitlines():
    if "Involuntary full rematerialization" not in line:
      continue
    op = re.search(r"HLO operation: (%[\w.\-]+ = \S+ [\w\-]+)", line)
    where = re.search(r'op_name="([^"]*)"', line)
    out.append((op.group(1) if op else line[:160]) + (f"  [{where.group(1)}]" if where else ""))
  return out


def _tpu_log() -> str:
  """What libtpu logged for this process: it writes XLA's warnings to files under TPU_LOG_DIR
  (default /tmp/tpu_logs) named with the process id, not to stderr."""
  import glob
  out = []
  for path in glob.glob(os.path.join(os.environ.get("TPU_LOG_DIR", "/tmp/tpu_logs"), f"*.{os.getpid()}")):
    try:
      with open(path, errors="replace") as f:
        out.append(f.read())
    except OSError:
      pass
  return "\n".join(out)


def _replicated(state, top: int = 8) -> tuple[list, int]:
  """Leaves of the train state held whole on every device, largest first, and their total bytes."""
  import jax

  rows, total = [], 0
  for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    sh = getattr(x, "sharding", None)
    if sh is None:
      continue
    full = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    if tuple(sh.shard_shape(x.shape)) == tuple(x.shape) and full:
      total += full
      rows.append((optim.path_of(kp), tuple(x.shape), str(np.dtype(x.dtype)), full))
  rows.sort(key=lambda r: -r[3])
  return rows[:top], total


def _oom_numbers(msg: str) -> str:
  m = re.search(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm", msg)
  return f"used {m.group(1)}B of {m.group(2)}B HBM" if m else msg.splitlines()[0][:300]


def op_roofline(text: str, chip: hardware.Chip, jaxpr_flops: float, top: int = 8) -> tuple[dict, list[str]]:
  """Per device, from compiled HLO `text`: matmul FLOPs and HBM bytes per step over its ops, and
  op_s = sum of max(FLOPs at peak, bytes at HBM bandwidth) per op, plus `jaxpr_flops` (per device)
  beyond the HLO count at peak (matmuls in library calls the count does not read). memory_bound:
  where the ops slower on memory than on their matmuls come from, largest excess first."""
  ops, notes = hlo.op_costs(text)
  flops = sum(o.count * o.flops for o in ops)
  missed = max(0.0, jaxpr_flops - flops) / chip.bf16_flops
  return dict(hlo_flops=flops, hbm_bytes=sum(o.count * o.bytes for o in ops),
              op_s=sum(o.seconds(chip.bf16_flops, chip.hbm_bw) for o in ops) + missed, missed_flops_s=missed,
              memory_bound=hlo.summarize_ops(ops, chip.bf16_flops, chip.hbm_bw, top)), notes


def _random_like(tree, key):
  """Device arrays shaped, typed and placed like the ShapeDtypeStructs of `tree`: small normal floats,
  zero integers (a step counter, the optimizer's counts)."""
  import jax
  import jax.numpy as jnp
  leaves, treedef = jax.tree.flatten(tree)

  def make(key):
    return treedef.unflatten([
        (0.02 * jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)).astype(x.dtype)
        if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros(x.shape, x.dtype) for i, x in enumerate(leaves)])
  return jax.jit(make, out_shardings=treedef.unflatten([x.sharding for x in leaves]))(key)


def _random_batch(batch, key):
  """A batch like the abstract one: normal pixels, all-ones masks, token ids in [5, 100) (valid for
  every vocabulary here), labels the same ids (every position carries loss)."""
  import jax
  import jax.numpy as jnp
  out = {}
  for i, (name, x) in enumerate(sorted(batch.items())):
    k = jax.random.fold_in(key, i)
    if jnp.issubdtype(x.dtype, jnp.floating):
      v = jax.random.normal(k, x.shape, x.dtype)
    elif "mask" in name:
      v = jnp.ones(x.shape, x.dtype)
    else:
      v = jax.random.randint(jax.random.fold_in(key, 99), x.shape, 5, 100, x.dtype)  # ids and labels alike
    out[name] = jax.device_put(v, x.sharding)
  return out


def run_steps(compiled, state, batch, rng, steps: int) -> dict:
  """Runs the compiled step on random weights and data on the attached devices: one warm-up call,
  then `steps` timed ones (the state fed back, as training does). -> step_s (median), all_s, peak
  (the device allocator's peak bytes, where it reports one)."""
  import statistics
  import time

  import jax
  state = _random_like(state, jax.random.PRNGKey(1))
  batch = _random_batch(batch, jax.random.PRNGKey(2))
  key = jax.random.PRNGKey(3)
  state, m = compiled(state, batch, key)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch, key)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  stats = jax.local_devices()[0].memory_stats() or {}
  return dict(step_s=statistics.median(times), all_s=times, peak=stats.get("peak_bytes_in_use"),
              loss=float(m["loss"]))


def _steps(config) -> int:
  return int(config.total_steps or 0)


def _model_flops(config, st, parts, mesh, state, batch, rng) -> float:
  """FLOPs of the same step without remat's recomputation (the MFU numerator)."""
  import flax.linen as nn
  import jax

  plain = dataclasses.replace(st, model=blip2.build(st.model.config.replace_runtime(remat="none")))
  fn = step_lib.make_train_step(loop.make_loss_fn(config, plain), parts.tx, accum_steps=config.accum_steps,
                                schedule=parts.schedule)
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
    return flops.count_flops(fn, state, batch, rng)


def compile_recipe(config, topology: str, *, recipe: str = "", recipe_batch: int | None = None,
                   log: list | None = None, devices=None, hlo_path: str | None = None,
                   chip: str | None = None, run: int = 0) -> Report:
  """Compiles `config`'s train step for `topology` (a slice name, hardware.parse_topology, or
  gpu / local: this host's devices, hardware.local_topology) and measures it. `recipe_batch`: the
  recipe's own global batch when `config` overrides it (the paper comparison scales to it).
  ValueError: bad input (topology, mesh, batch, recipe); DoesNotFit: the compiler ran out of HBM
  (its numbers in the message). `log` collects libtpu's / XLA's stderr. `devices`: compile for these
  instead of the topology's (tests: host CPU devices; the chip figures stay the topology's).
  `hlo_path`: also write the optimized HLO text there. `chip`: a hardware.CHIPS key whose figures
  replace the topology's. `run` (local devices only): also run that many steps on random weights
  and data (`run_steps`) and keep the measured step time in `Report.measured`."""
  import flax.linen as nn
  import jax

  log = [] if log is None else log
  if run and not hardware.is_local(topology):
    raise ValueError("--run times the step on this host's devices: use it with --topology gpu / local")
  if hardware.is_local(topology):
    devices = jax.devices() if devices is None else devices
    topo = hardware.local_topology(topology, devices, chip)
  else:
    if chip:
      raise ValueError("--chip names the figures of this host's devices: use it with --topology gpu / local")
    topo = hardware.parse_topology(topology)
  if devices is None:
    mismatch = hardware.libtpu_mismatch()  # before the minutes of compiling that would end in XLA's RET_CHECK
    if mismatch:
      raise ValueError(mismatch)
    if not hardware.libtpu_available():
      want = hardware.libtpu_requirement() or "libtpu"
      raise ValueError(f"libtpu is not installed, so there is no TPU compiler: pip install \"{want}\" "
                       f"(what jax[tpu]=={jax.__version__} pins)")
    with captured_stderr(log):
      devices = hardware.topology_devices(topo)
  mesh = loop.make_train_mesh(config, devices)
  st = loop.build_setup(config, abstract=True)
  steps = _steps(config)
  parts = loop.make_step(config, st, mesh, steps or 1, abstract=True)
  batch = batches.abstract_batch(config, st, step_lib.batch_sharding(mesh))
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=shd.replicated(mesh))
  jitted = parts.train_step.jitted
  with jax.set_mesh(mesh):
    lowered = jitted.lower(parts.state, batch, rng)
  sink: list = []
  try:
    with captured_stderr(sink):
      compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error type
    log.extend(sink)
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg:
      raise DoesNotFit(_oom_numbers(msg)) from e
    raise
  log.extend(sink)
  mem = compiled.memory_analysis()
  hbm = topo.chip.hbm_bytes
  memory = dict(argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes,
                temp=mem.temp_size_in_bytes, code=mem.generated_code_size_in_bytes, hbm=hbm)
  memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] + memory["code"]
  text = compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(text)
  colls, notes = hlo.collectives(text, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
    hw = flops.count_flops(jitted, parts.state, batch, rng)
  model = _model_flops(config, st, parts, mesh, parts.state, batch, rng)
  ops, op_notes = op_roofline(text, topo.chip, hw / topo.chips)
  notes += op_notes
  replicated, rep_bytes = _replicated(parts.state)
  if not steps:
    notes.append("the recipe counts epochs, not steps (total_steps 0): no days estimated; set "
                 "--config.total_steps to get them")
  rep = Report(recipe=recipe, topology=topo, mesh=dict(mesh.shape), global_batch=int(config.global_batch_size),
               recipe_batch=int(recipe_batch or config.global_batch_size), remat=str(config.model.remat), steps=steps, memory=memory,
               hw_flops=hw, model_flops=model, collectives=colls, replicated=replicated, replicated_bytes=rep_bytes,
               involuntary=sorted(set(_involuntary("".join(sink) + _tpu_log()))), notes=notes,
               task=str(config.task), ops=ops)
  if run:
    rep.measured = run_steps(compiled, parts.state, batch, rng, run)
  return rep


# ----------------------------------------------------------------------------------------
# text


def _b(n: float) -> str:
  for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} B"


def _t(s: float) -> str:
  return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def _where(op_name: str) -> str:
  """The informative tail of a jax op_name: the pass and the layer."""
  parts = [p for p in op_name.split("/") if p and p not in ("jit(run)", "body", "while", "closed_call")]
  return "/".join(parts[-4:])[-110:] or op_name


def format_report(r: Report, top: int = 12) -> str:
  chip = r.topology.chip
  m = r.memory
  lines = [
      f"{r.recipe or r.task}: {r.topology.name} = {r.devices} x {chip.name} ({r.topology.libtpu_name}), mesh "
      + " x ".join(f"{k} {v}" for k, v in r.mesh.items()) + f", global batch {r.global_batch}"
      + (f" (recipe: {r.recipe_batch})" if r.recipe_batch != r.global_batch else "") + f", remat {r.remat}",
      "",
      "memory per device: "
      + ", ".join(f"{k} {_b(m[k])}" for k in ("argument", "output", "alias", "temp"))
      + f"; peak {_b(m['peak'])} of {_b(m['hbm'])} HBM ({100 * m['peak'] / m['hbm']:.0f}%): "
      + ("fits" if r.fits else "DOES NOT FIT"),
      f"matmul FLOPs per step: {r.hw_flops / 1e12:.1f} TFLOP as compiled ({r.hw_flops / r.devices / 1e12:.2f} per "
      f"device), {r.model_flops / 1e12:.1f} TFLOP without remat recomputation",
  ]
  rows = hlo.summarize(r.collectives)
  total = sum(x["traffic"] for x in rows)
  lines += ["", f"collectives per step (per device): {sum(x['count'] for x in rows):.0f} calls, "
            f"{_b(total)} sent; largest first:",
            f"  {'kind':<18} {'axes':<18} {'loop':<4} {'calls':>6} {'bytes each':>11} {'sent':>11} {'time':>9}  where"]
  link = chip.link_bw
  for x in rows[:top]:
    t = x["traffic"] / (max(x["phys_dims"], 1) * link)
    where = x["where"].split("/")
    where = "/".join(where[1:5]) if len(where) > 1 else x["where"]
    lines.append(f"  {x['kind']:<18} {','.join(x['axes']) or '-':<18} {'yes' if x['in_loop'] else 'no':<4} "
                 f"{x['count']:>6.0f} {_b(x['bytes']):>11} {_b(x['traffic']):>11} {_t(t):>9}  {where[:70]}")
  if len(rows) > top:
    rest = rows[top:]
    lines.append(f"  ... {len(rest)} more groups, {_b(sum(x['traffic'] for x in rest))} sent")
  lines += ["", f"replicated state (whole on every device): {_b(r.replicated_bytes)} in all; largest:"]
  for path, shape, dtype, nbytes in r.replicated[:6]:
    lines.append(f"  {path} {shape} {dtype}: {_b(nbytes)}")
  if r.involuntary:
    lines += ["", f"XLA involuntary full rematerializations: {len(r.involuntary)}"]
    lines += [f"  {x[:200]}" for x in r.involuntary[:6]]
  rf = r.roofline()
  if r.ops:
    o = r.ops
    lines += ["", f"HBM traffic per step (per device): {_b(o['hbm_bytes'])} read + written, {_t(rf['memory_s'])} at "
              f"{chip.hbm_bw / 1e9:.0f} GB/s; matmuls ({o['hlo_flops'] / 1e12:.2f} TFLOP in the HLO) at peak "
              f"{_t(rf['compute_s'])}; each op the slower of the two, summed: {_t(rf['ops_s'])}"]
    if o.get("missed_flops_s", 0.0) > 0.005 * rf["ops_s"]:  # round-off between the two counts is not news
      lines.append(f"  ({_t(o['missed_flops_s'])} of it: matmul FLOPs the HLO count does not see, at peak)")
    if o.get("memory_bound"):
      lines.append("  ops slower on memory than on matmuls, by where they come from (time beyond their matmuls):")
      for x in o["memory_bound"][:6]:
        lines.append(f"  {_t(x['excess']):>9} {_b(x['bytes']):>11}  {_where(x['where'])}")
  lines += ["", f"roofline on {chip.name} ({chip.bf16_flops / 1e12:.0f} TFLOP/s bf16, "
            f"HBM {chip.hbm_bw / 1e9:.0f} GB/s, "
            f"ICI {chip.ici_bw / 1e9:.0f} GB/s per chip over {chip.ici_links} links): ops {_t(rf['ops_s'])}, "
            f"collectives {_t(rf['comm_s'])}; step {_t(rf['overlapped_s'])} overlapped / {_t(rf['serial_s'])} not",
            f"MFU (estimate) {100 * rf['mfu_overlapped']:.1f}% overlapped / {100 * rf['mfu_serial']:.1f}% not; "
            f"{r.global_batch / rf['overlapped_s']:.0f} / {r.global_batch / rf['serial_s']:.0f} samples/s"]
  if r.measured:
    x = r.measured
    mfu = r.model_flops / r.devices / (x["step_s"] * chip.bf16_flops)
    lines.append(f"measured on this host (random weights and data, median of {len(x['all_s'])}): step "
                 f"{_t(x['step_s'])}, MFU {100 * mfu:.1f}%, {r.global_batch / x['step_s']:.0f} samples/s"
                 + (f", peak memory {_b(x['peak'])} (device allocator)" if x.get("peak") else "")
                 + f"; estimate / measured {rf['serial_s'] / x['step_s']:.2f}")
  if r.steps:
    lines.append(f"{r.steps} steps: {rf['days_overlapped']:.2f} days overlapped / {rf['days_serial']:.2f} days not")
  p = r.paper()
  if p:
    lines.append(f"paper: < {p['days']} days for {p['steps']} steps on {PAPER_GPUS} x A100-40G "
                 f"(at least {100 * p['mfu_at_least']:.1f}% MFU for these FLOPs at the paper's batch)")
  lines += [f"note: {n}" for n in r.notes]
  lines.append(f"chip figures: {chip.source}")
  return "\n".join(lines)


FIT_HINT = ("try more fsdp (--mesh), more remat (--config.model.remat=full), a smaller --global-batch with "
            "--config.accum_steps, or a larger slice")


def fit_message(r: Report) -> str:
  m = r.memory
  return (f"{r.recipe or r.task} does not fit {r.topology.name}: the step needs {_b(m['peak'])} per device "
          f"(arguments {_b(m['argument'])}, temporaries {_b(m['temp'])}) but a {r.topology.chip.name} has "
          f"{_b(m['hbm'])}; " + FIT_HINT)
