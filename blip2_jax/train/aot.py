"""Ahead-of-time compilation of a recipe's real train step for a TPU slice that is not attached.

    python -m blip2_jax.aot --config configs/stage1.py:vit=g --topology v5p-128

`compile_recipe` builds the step exactly as `python -m blip2_jax.train` does (train/loop.py
`make_train_mesh`, `build_setup`, `make_step`), but from abstract parameters (train/setup.py
`build_abstract`: the released model's shapes, nothing read) and an abstract batch, over the
compile-only devices libtpu describes for the slice; then XLA's TPU compiler runs on this host.
From the compiled program it reports per device: memory against the chip's HBM, matmul FLOPs
(`blip2_jax.core.flops`, scanned layers counted), every collective (`core.hlo`), the largest replicated
arrays, XLA's involuntary-rematerialisation warnings, and a roofline step time from the published
chip figures (`core.hardware`): compute at peak FLOP/s, collectives at ICI bandwidth, overlapped
(max) and not (sum); the MFU and the days for the recipe's schedule follow. Roofline figures are
ceilings: a real step also spends time in memory-bound ops and on imperfect overlap.
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
    chip = self.topology.chip
    compute = self.hw_flops / self.devices / chip.bf16_flops
    comm = self.comm_seconds()
    out = dict(compute_s=compute, comm_s=comm, overlapped_s=max(compute, comm), serial_s=compute + comm)
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
                chip=self.topology.chip.name, devices=self.devices, mesh=self.mesh, global_batch=self.global_batch,
                remat=self.remat, steps=self.steps, memory=self.memory, fits=self.fits, hw_flops=self.hw_flops,
                model_flops=self.model_flops, roofline=self.roofline(), paper=self.paper(),
                collectives=[dataclasses.asdict(c) for c in self.collectives],
                collective_summary=hlo.summarize(self.collectives), replicated=self.replicated,
                replicated_bytes=self.replicated_bytes, involuntary=self.involuntary, notes=self.notes)


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
                   log: list | None = None, devices=None, hlo_path: str | None = None) -> Report:
  """Compiles `config`'s train step for `topology` (a slice name, hardware.parse_topology) and
  measures it. `recipe_batch`: the recipe's own global batch when `config` overrides it (the paper
  comparison scales to it). ValueError: bad input (topology, mesh, batch, recipe); DoesNotFit: the
  compiler ran out of HBM (its numbers in the message). `log` collects libtpu's / XLA's stderr.
  `devices`: compile for these instead of the topology's (tests: host CPU devices; the chip figures
  stay the topology's). `hlo_path`: also write the optimized HLO text there."""
  import flax.linen as nn
  import jax

  log = [] if log is None else log
  topo = hardware.parse_topology(topology)
  if devices is None:
    if not hardware.libtpu_available():
      raise ValueError("libtpu is not installed, so there is no TPU compiler: pip install libtpu "
                       f"(the version jax[tpu]=={jax.__version__} pins)")
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
  replicated, rep_bytes = _replicated(parts.state)
  if not steps:
    notes.append("the recipe counts epochs, not steps (total_steps 0): no days estimated; set "
                 "--config.total_steps to get them")
  rep = Report(recipe=recipe, topology=topo, mesh=dict(mesh.shape), global_batch=int(config.global_batch_size),
               recipe_batch=int(recipe_batch or config.global_batch_size), remat=str(config.model.remat), steps=steps, memory=memory,
               hw_flops=hw, model_flops=model, collectives=colls, replicated=replicated, replicated_bytes=rep_bytes,
               involuntary=sorted(set(_involuntary("".join(sink) + _tpu_log()))), notes=notes,
               task=str(config.task))
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
  lines += ["", f"roofline on {chip.name} ({chip.bf16_flops / 1e12:.0f} TFLOP/s bf16, ICI {chip.ici_bw / 1e9:.0f} GB/s "
            f"per chip over {chip.ici_links} links): compute {_t(rf['compute_s'])}, collectives {_t(rf['comm_s'])}; "
            f"step {_t(rf['overlapped_s'])} overlapped / {_t(rf['serial_s'])} not",
            f"MFU (ceiling) {100 * rf['mfu_overlapped']:.1f}% overlapped / {100 * rf['mfu_serial']:.1f}% not; "
            f"{r.global_batch / rf['overlapped_s']:.0f} / {r.global_batch / rf['serial_s']:.0f} samples/s"]
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
