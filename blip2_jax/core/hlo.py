"""Collectives of a compiled (optimized, per-device) HLO module, read from its text.

    colls = collectives(compiled.as_text(), mesh)   # [Collective], counts per step

Each collective is counted as often as it runs: the bodies of while loops (scanned layers) are
multiplied by their trip count, read from XLA's `known_trip_count` or from the loop condition
(`i < N`, with i's start when it is a constant). A channel id is one collective: the pieces of a TPU
async collective that the compiler spreads over later loops count once. Fused collectives count once per fusion call;
TPU's `all-reduce-scatter` fusions (an all-reduce whose result each device slices) count as the
reduce-scatter they implement. Replica groups, in any of XLA's three notations (explicit lists,
iota `[G,S]<=[N]`, mesh axes `mesh[...] {axes}`), are mapped to the mesh axes they span: ids in
them are positions in the mesh's device order (SPMD partition ids).

Bytes: `bytes` is the whole buffer the collective assembles or reduces (an all-gather's output, a
reduce-scatter's input, an all-reduce's operand); `traffic()` is what each device sends over its
links for a ring algorithm: (g-1)/g of it (twice for an all-reduce; a permute sends it once).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OPCODES = {k: k for k in KINDS}
_OPCODES.update({f"{k}-start": k for k in KINDS})
_OPCODES["ragged-all-to-all"] = "all-to-all"

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+[a-z]*)?)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")


def _array_bytes(shape_text: str) -> list[int]:
  out = []
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype.startswith("f8"):
      size = 1
    elif dtype in _DTYPE_BYTES:
      size = _DTYPE_BYTES[dtype]
    else:
      continue
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    out.append(int(n * size))
  return out


def _split_shape(rest: str) -> tuple[str, str]:
  """'(a, b) op(...)' or 'f32[2]{0} op(...)' -> (shape text, 'op(...)...')."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  shape, _, tail = rest.partition(" ")
  return shape, tail


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str
  line: str


def _parse_instr(line: str) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  shape, tail = _split_shape(line[m.end():])
  op = re.match(r"([a-z][\w\-]*)\(", tail)
  if not op:
    return None
  depth, i = 0, op.end() - 1
  for i in range(op.end() - 1, len(tail)):
    depth += tail[i] == "("
    depth -= tail[i] == ")"
    if depth == 0:
      break
  args = tail[op.end():i]
  return Instr(m.group(1), shape, op.group(1), re.findall(r"%([\w.\-]+)", args), tail[i + 1:], line)


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
  """HLO module text -> ({computation: [Instr]}, entry name)."""
  comps: dict[str, list[Instr]] = {}
  entry, cur = "", None
  for line in text.splitlines():
    h = _HEADER.match(line)
    if h:
      cur = h.group(2)
      comps[cur] = []
      if h.group(1):
        entry = cur
      continue
    if line.startswith("}"):
      cur = None
      continue
    if cur is not None:
      ins = _parse_instr(line)
      if ins is not None:
        comps[cur].append(ins)
  return comps, entry


# ----------------------------------------------------------------------------------------
# replica groups


def _iota(dims: Sequence[int], reshape: Sequence[int] | None = None, perm: Sequence[int] | None = None):
  n = int(np.prod(dims))
  a = np.arange(n).reshape(reshape if reshape else dims)
  if perm:
    a = a.transpose(perm)
  return a.reshape(dims)


def _ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",") if x.strip()]


def _mesh_groups(spec: str) -> list[list[int]] | None:
  """mesh['a'=4,'b'=2], device_ids=([2,4]T(1,0)) {'a'} (axis refs may be sub-axes 'a':(1)2)."""
  m = re.match(r"mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", spec)
  if not m:
    return None
  names, sizes = [], []
  for item in filter(None, (x.strip() for x in m.group(1).split(","))):
    k, _, v = item.partition("=")
    names.append(k.strip().strip("'\""))
    sizes.append(int(v))
  n = int(np.prod(sizes))
  ids = np.arange(n)
  if m.group(2):
    d = re.match(r"\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?", m.group(2).strip())
    if d:
      dims = _ints(d.group(1))
      reshape = _ints(d.group(2)) if d.group(2) else None
      perm = _ints(d.group(3)) if d.group(3) else None
      if reshape is None and perm is not None:  # '[2,4]T(1,0)': iota over [2,4], transposed
        ids = np.arange(n).reshape(dims).transpose(perm).reshape(-1)
      else:
        ids = _iota(dims, reshape, perm).reshape(-1)
  refs: dict[int, list[tuple[int, int] | None]] = {}
  order = []
  for ref in filter(None, (x.strip() for x in m.group(3).split(","))):
    r = re.match(r"'?([^':]+)'?(?::\((\d+)\)(\d+))?", ref)
    axis = names.index(r.group(1))
    sub = (int(r.group(2)), int(r.group(3))) if r.group(2) else None
    refs.setdefault(axis, []).append(sub)
    order.append((axis, len(refs[axis]) - 1))
  # split each referenced axis into (pre, size, post) pieces; the groups span the `size` pieces
  dims, grouped, pos = [], {}, 0
  for a, size in enumerate(sizes):
    if a not in refs or refs[a] == [None]:
      dims.append(size)
      if a in refs:
        grouped[(a, 0)] = pos
      pos += 1
      continue
    subs = sorted(enumerate(refs[a]), key=lambda t: t[1][0])
    prefix = 1
    for j, (pre, sz) in subs:
      if pre != prefix:
        dims.append(pre // prefix)
        pos += 1
        prefix = pre
      dims.append(sz)
      grouped[(a, j)] = pos
      pos += 1
      prefix *= sz
    if prefix != size:
      dims.append(size // prefix)
      pos += 1
  gaxes = [grouped[k] for k in order]
  rest = [i for i in range(len(dims)) if i not in gaxes]
  arr = ids.reshape(dims).transpose(rest + gaxes)
  gsize = int(np.prod([dims[i] for i in gaxes])) if gaxes else 1
  return arr.reshape(-1, gsize).tolist()


def replica_groups(attrs: str, num_devices: int) -> list[list[int]]:
  """The device groups of a collective's attribute text (all devices when none are given)."""
  m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
  if m:
    return [_ints(p) for p in re.findall(r"\{([\d,]+)", m.group(1) + "}")]
  m = re.search(r"replica_groups=(.*)", attrs)
  if not m:
    return [list(range(num_devices))]
  spec = m.group(1)
  if spec.startswith("mesh["):
    groups = _mesh_groups(spec)
    if groups is not None:
      return groups
  it = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
  if it:
    dims = _ints(it.group(1))
    arr = _iota(dims, _ints(it.group(2)), _ints(it.group(3)) if it.group(3) else None)
    return arr.reshape(dims[0], -1).tolist()
  ex = re.match(r"\{((?:\{[\d,]*\},?)*)\}", spec)
  if ex:
    groups = [_ints(g) for g in re.findall(r"\{([\d,]*)\}", ex.group(1))]
    groups = [g for g in groups if g]
    return groups or [list(range(num_devices))]
  return [list(range(num_devices))]


def spanned_axes(groups: list[list[int]], mesh_shape: Sequence[int], axis_names: Sequence[str]) -> tuple[str, ...]:
  """Mesh axes along which the devices of a group differ (union over groups)."""
  varying = np.zeros(len(mesh_shape), bool)
  for g in groups:
    if len(g) > 1:
      coords = np.array(np.unravel_index(np.asarray(g), tuple(mesh_shape))).T
      varying |= (coords != coords[0]).any(axis=0)
  return tuple(a for a, v in zip(axis_names, varying) if v)


def physical_dims(group: list[int], flat_devices) -> int:
  """How many physical torus dimensions a group spans (its devices' `coords`); 0 when unknown."""
  try:
    coords = np.array([flat_devices[i].coords for i in group])
  except (AttributeError, IndexError, TypeError):
    return 0
  return int((coords != coords[0]).any(axis=0).sum())


# ----------------------------------------------------------------------------------------
# collectives


@dataclasses.dataclass
class Collective:
  kind: str
  bytes: int             # the whole buffer (see the module docstring)
  count: float           # executions per step
  group_size: int
  axes: tuple[str, ...]  # mesh axes spanned
  phys_dims: int         # physical torus dimensions spanned (0: unknown)
  in_loop: bool          # inside a while loop (a scanned layer)
  op_name: str           # jax's op_name metadata: where in the program it comes from
  name: str
  channel: int | None = None
  piece: bool = False    # inside a TPU async_collective_fusion (a piece of a collective started elsewhere)

  def traffic(self) -> float:
    """Bytes each device sends per execution (ring algorithms)."""
    g = max(self.group_size, 1)
    if self.kind == "collective-permute":
      return float(self.bytes)
    frac = (g - 1) / g
    return (2 * frac if self.kind == "all-reduce" else frac) * self.bytes


def _trip_count(ins: Instr, comps, defs: dict[str, Instr]) -> int | None:
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.line)
  if m:
    return int(m.group(1))
  cm = re.search(r"condition=%([\w.\-]+)", ins.attrs)
  if not cm or cm.group(1) not in comps:
    return None
  cond = comps[cm.group(1)]
  cdefs = {i.name: i for i in cond}
  root = next((i for i in reversed(cond) if i.line.lstrip().startswith("ROOT")), None)
  if root is None or root.opcode != "compare" or len(root.operands) != 2:
    return None
  direction = re.search(r"direction=(\w+)", root.attrs)
  direction = direction.group(1) if direction else "LT"
  a, b = (cdefs.get(o) for o in root.operands)
  const, counter = (b, a) if b is not None and b.opcode == "constant" else (a, b)
  if const is None or const.opcode != "constant" or counter is None:
    return None
  bound = int(float(re.match(r"\s*([-\d.e+]+)", const.line.split("constant(", 1)[1]).group(1)))
  start = 0
  idx = re.search(r"index=(\d+)", counter.attrs) if counter.opcode == "get-tuple-element" else None
  init = defs.get(ins.operands[0]) if ins.operands else None
  if idx and init is not None and init.opcode == "tuple" and int(idx.group(1)) < len(init.operands):
    src = defs.get(init.operands[int(idx.group(1))])
    while src is not None and src.opcode in ("copy", "copy-done", "bitcast", "convert") and src.operands:
      src = defs.get(src.operands[0])
    if src is not None and src.opcode == "constant":
      start = int(float(src.line.split("constant(", 1)[1].split(")")[0]))
  trips = {"LT": bound - start, "LE": bound - start + 1, "NE": bound - start,
           "GT": start - bound, "GE": start - bound + 1}.get(direction)
  return trips if trips and trips > 0 else None


def _loop(ins: Instr, comps, defs: dict[str, Instr], notes: list[str], what: str) -> tuple[str | None, int]:
  """(body computation, trip count) of a `while`; an unknown trip count is 1, with a note."""
  body = re.search(r"body=%([\w.\-]+)", ins.attrs)
  trips = _trip_count(ins, comps, defs)
  if trips is None:
    notes.append(f"trip count of {ins.name} unknown: its {what} are counted once")
    trips = 1
  return (body.group(1) if body else None), trips


def _callees(ins: Instr) -> list[str]:
  """The computations a fusion / call / conditional / async-start runs (every branch of a
  conditional: an upper bound)."""
  called = re.findall(r"(?:calls|to_apply|true_computation|false_computation)=%([\w.\-]+)", ins.attrs)
  branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
  if branches:
    called += re.findall(r"%([\w.\-]+)", branches.group(1))
  return called


def collectives(text: str, mesh) -> tuple[list[Collective], list[str]]:
  """The collectives of compiled HLO `text` over `mesh` (a jax Mesh) -> (collectives, notes)."""
  comps, entry = parse_module(text)
  flat = list(mesh.devices.flat)
  shape, names = tuple(mesh.devices.shape), tuple(mesh.axis_names)
  out: list[Collective] = []
  notes: list[str] = []

  def record(kind, ins, nbytes, mult, in_loop, meta=None, piece=False):
    groups = replica_groups(ins.attrs, len(flat))
    size = len(groups[0]) if groups else 1
    op = re.search(r'op_name="([^"]*)"', (meta or ins).line)
    channel = re.search(r"channel_id=(\d+)", ins.attrs)
    out.append(Collective(kind, int(nbytes), mult, size if kind != "collective-permute" else 2,
                          spanned_axes(groups, shape, names), physical_dims(groups[0], flat) if groups else 0,
                          in_loop, op.group(1) if op else "", ins.name, int(channel.group(1)) if channel else None,
                          piece))

  def walk(comp: str, mult: float, in_loop: bool, seen: tuple[str, ...] = ()):
    piece = comp.startswith("async_collective_fusion")
    if comp not in comps or comp in seen:
      return
    body = comps[comp]
    defs = {i.name: i for i in body}
    # TPU: an async collective's start and done fusions both hold the collective; the start counts
    done = any('custom_call_target="AsyncCollectiveDone"' in i.attrs for i in body)
    for ins in body:
      kind = _OPCODES.get(ins.opcode)
      if kind is not None and done:
        continue
      if kind is not None:
        sizes = _array_bytes(ins.shape)
        if not sizes:
          continue
        if kind == "all-gather":
          nbytes = max(sizes)
        elif kind == "collective-permute":
          nbytes = sizes[0]
        elif kind == "reduce-scatter":
          groups = replica_groups(ins.attrs, len(flat))
          nbytes = sizes[-1] * len(groups[0])
        else:
          nbytes = sum(sizes) if not ins.opcode.endswith("-start") else sizes[0]
        record(kind, ins, nbytes, mult, in_loop, piece=piece)
        continue
      if ins.opcode == "while":
        body_name, trips = _loop(ins, comps, defs, notes, "collectives")
        if body_name:
          walk(body_name, mult * trips, True, seen + (comp,))
      elif ins.opcode == "fusion" or ins.opcode.startswith("async-start") or ins.opcode in ("call", "conditional"):
        for c in _callees(ins):
          if c.startswith("all-reduce-scatter"):  # TPU: all-reduce + per-device slice = a reduce-scatter
            ar = next((i for i in comps.get(c, []) if i.opcode in ("all-reduce", "all-reduce-start")), None)
            if ar is not None:
              record("reduce-scatter", ar, sum(_array_bytes(ar.shape)), mult, in_loop, meta=ins)
            continue
          walk(c, mult, in_loop, seen + (comp,))

  walk(entry, 1.0, False)
  return _one_per_channel(out), notes


def _one_per_channel(colls: list[Collective]) -> list[Collective]:
  """Each collective once where TPU async-collective pieces repeat it. TPU's async collectives are
  started once and advanced by `async_collective_fusion` pieces placed inside the loops that overlap
  them (and finished by another fusion); each piece repeats the collective with its channel id,
  kind and shape. Collectives outside such pieces all count; a piece counts only when no collective
  outside the pieces has its channel, kind and size, and then once per (channel, kind, size, axes):
  its least repeated occurrence (the start). Channel ids alone do not identify a collective: XLA
  numbers every shard_map collective 1 (on the CPU and on TPU slices alike)."""
  def key(c):
    return (c.channel, c.kind, c.bytes, c.axes)
  whole = [c for c in colls if not c.piece]
  started = {key(c) for c in whole}
  best: dict[tuple, Collective] = {}
  for c in colls:
    if c.piece and key(c) not in started and (key(c) not in best or c.count < best[key(c)].count):
      best[key(c)] = c
  return whole + list(best.values())


def summarize(colls: list[Collective]) -> list[dict]:
  """Collectives grouped by (kind, mesh axes, in a loop or not, bytes each), largest traffic first."""
  rows: dict[tuple, dict] = {}
  for c in colls:
    key = (c.kind, c.axes, c.in_loop, c.bytes, c.group_size)
    r = rows.setdefault(key, dict(kind=c.kind, axes=c.axes, in_loop=c.in_loop, bytes=c.bytes, group_size=c.group_size,
                                  phys_dims=c.phys_dims, count=0.0, traffic=0.0, where=c.op_name))
    r["count"] += c.count
    r["traffic"] += c.count * c.traffic()
  return sorted(rows.values(), key=lambda r: -r["traffic"])


# ----------------------------------------------------------------------------------------
# per-op cost: matmul FLOPs and HBM bytes


_ARRAY_LAYOUT = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+[a-z]*)?)\[([\d,]*)\](\{[^}]*\})?")
# no HBM traffic of their own: aliases, tuples, scalars' bookkeeping, async halves counted at their start
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id",
         "opt-barrier", "optimization-barrier", "add-dependency", "domain", "get-dimension-size", "copy-done",
         "slice-done", "async-done", "async-update", "send-done", "recv-done"}
_DONE = {f"{k}-done" for k in KINDS}
_SLICING = ("dynamic-slice", "slice", "gather")


def _padded(dims: list[int], layout: str) -> int:
  """Elements an array occupies under its TPU tiling: the layout's first tile T(a,b) pads the two
  most minor dimensions (physical order) to multiples of a and b (8 x 128 for most arrays: a
  minor dimension of 257 takes 384)."""
  n = int(np.prod(dims)) if dims else 1
  m = re.match(r"\{([\d,]*):[^}]*?T\(([\d,]+)\)", layout or "")
  if not m or not dims:
    return n
  order = [int(x) for x in m.group(1).split(",") if x]
  tile = [int(x) for x in m.group(2).split(",")]
  padded = list(dims)
  for t, d in zip(reversed(tile), order):  # tile's last entry pads the most minor dimension
    if d < len(padded):
      padded[d] = -(-padded[d] // t) * t
  return int(np.prod(padded))


def _arrays(shape_text: str) -> list[tuple[int, float, bool]]:
  """(elements as laid out, bytes per element, in HBM) of each array in a shape. Arrays placed in
  another memory space (TPU layouts `S(n)`, n > 0: on-chip VMEM / SMEM) are not HBM."""
  out = []
  for dtype, dims, layout in _ARRAY_LAYOUT.findall(shape_text):
    size = 1 if dtype.startswith("f8") else _DTYPE_BYTES.get(dtype)
    if size is None:
      continue
    space = re.search(r"S\((\d+)\)", layout or "")
    out.append((_padded([int(d) for d in dims.split(",") if d], layout), size, not space or space.group(1) == "0"))
  return out


def _hbm(shape_text: str) -> float:
  return float(sum(n * b for n, b, hbm in _arrays(shape_text) if hbm))


def _logical(shape_text: str) -> float:
  return float(sum(n * b for n, b, _ in _arrays(shape_text)))


def _dims(shape_text: str) -> list[int]:
  m = _ARRAY_LAYOUT.search(shape_text)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _window(attrs: str, key: str, n: int, default: int) -> list[int]:
  m = re.search(rf"\b{key}=([\d_x\-]+)", attrs)
  if not m:
    return [default] * n
  return [int(x.split("_")[0]) for x in m.group(1).split("x")]


def _conv_flops(ins: Instr, defs: dict[str, Instr]) -> float:
  """2 x (output elements) x (kernel input features) x (window taps that land on input elements).
  TPU writes batched and transposed matmuls as convolutions whose batch or head dimensions are
  windows over an lhs-dilated or padded input, where one tap of the window does: the taps are
  counted per spatial dimension from the window's size, stride, padding and dilations."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  if not labels or len(ins.operands) < 2 or any(o not in defs for o in ins.operands[:2]):
    return 0.0
  lhs_l, ker_l, out_l = labels.groups()
  lhs, ker, out = _dims(defs[ins.operands[0]].shape), _dims(defs[ins.operands[1]].shape), _dims(ins.shape)
  if "i" not in ker_l or len(ker) != len(ker_l) or len(lhs) != len(lhs_l) or len(out) != len(out_l):
    return 0.0
  spatial = sorted(c for c in out_l if c.isdigit())
  window = re.search(r"window=\{([^}]*)\}", ins.attrs)
  w_attrs = window.group(1) if window else ""
  nsp = len(spatial)
  size = _window(w_attrs, "size", nsp, 1)
  stride = _window(w_attrs, "stride", nsp, 1)
  pad_lo = _window(w_attrs, "pad", nsp, 0)
  lhs_dil = _window(w_attrs, "lhs_dilate", nsp, 1)
  rhs_dil = _window(w_attrs, "rhs_dilate", nsp, 1)
  taps, out_spatial = 1.0, 1.0
  for c in spatial:
    j = int(c)
    n, m = lhs[lhs_l.index(c)], out[out_l.index(c)]
    pos = (np.arange(m)[:, None] * stride[j] + np.arange(size[j])[None, :] * rhs_dil[j] - pad_lo[j])
    hits = (pos >= 0) & (pos <= (n - 1) * lhs_dil[j]) & (pos % max(lhs_dil[j], 1) == 0)
    taps *= float(hits.sum())
    out_spatial *= m
  return 2.0 * float(np.prod(out)) / max(out_spatial, 1.0) * ker[ker_l.index("i")] * taps


def _dot_flops(ins: Instr, defs: dict[str, Instr]) -> float:
  """2 x output elements x contracted size, for dot, convolution and cuBLAS GEMM custom calls."""
  out = _dims(ins.shape)
  if ins.opcode == "convolution":
    return _conv_flops(ins, defs)
  lhs = defs.get(ins.operands[0]) if ins.operands else None
  if lhs is None:
    return 0.0
  if ins.opcode == "dot":
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
  else:  # custom-call: the GEMM's backend_config
    contracting = re.search(r'"lhs_contracting_dimensions":\[([\d",\s]*)\]', ins.attrs)
  if not contracting:
    return 0.0
  shape = _dims(lhs.shape)
  k = 1
  for d in re.findall(r"\d+", contracting.group(1)):
    k *= shape[int(d)] if int(d) < len(shape) else 1
  return 2.0 * float(np.prod(out)) * k


def _is_gemm(ins: Instr) -> bool:
  return ins.opcode in ("dot", "convolution") or (
      ins.opcode == "custom-call" and re.search(r'custom_call_target="__cublas\$(?:lt\$)?(?:gemm|matmul)', ins.attrs)
      is not None)


def _called(ins: Instr) -> list[str]:
  return re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", ins.attrs)


def _comp_flops(comps, name: str, seen=()) -> float:
  """Matmul FLOPs inside a fused computation (nested fusions included)."""
  if name not in comps or name in seen:
    return 0.0
  body = comps[name]
  defs = {i.name: i for i in body}
  total = 0.0
  for ins in body:
    if _is_gemm(ins):
      total += _dot_flops(ins, defs)
    elif ins.opcode == "fusion":
      total += sum(_comp_flops(comps, c, seen + (name,)) for c in _called(ins))
  return total


def _reads(comps, comp: str, name: str, full: float, depth: int = 0) -> float:
  """HBM bytes a fused computation reads of its value `name` (a parameter, `full` bytes): only the
  slices when every use slices it (a scanned layer's weights out of the stacked ones), nothing when
  it is the buffer a dynamic-update-slice writes in place, else all of it."""
  body = comps.get(comp, [])
  total = 0.0
  for u in body:
    if name not in u.operands:
      continue
    if u.opcode in _SLICING and u.operands[0] == name:
      total += _logical(u.shape)
    elif u.opcode == "dynamic-update-slice" and u.operands[0] == name and u.operands.count(name) == 1:
      continue
    elif u.opcode == "bitcast" and depth < 8:
      total += _reads(comps, comp, u.name, full, depth + 1)
    elif u.opcode == "fusion" and depth < 8 and _called(u):
      inner = _called(u)[0]
      params = {int(re.search(r"parameter\((\d+)\)", i.line).group(1)): i.name
                for i in comps.get(inner, []) if i.opcode == "parameter"}
      for j, o in enumerate(u.operands):
        if o == name and j in params:
          total += _reads(comps, inner, params[j], full, depth + 1)
    else:
      return full
  return min(total, full)


def _writes(comps, comp: str, ins: Instr, defs: dict[str, Instr], depth: int = 0) -> list[float]:
  """Logical bytes each output of `ins` (inside `comp`) writes: a dynamic-update-slice writes only
  its update (in place), a tuple its elements; one entry per array of the output."""
  if depth < 8:
    if ins.opcode == "dynamic-update-slice" and len(ins.operands) > 1 and ins.operands[1] in defs:
      return [_logical(defs[ins.operands[1]].shape)]
    if ins.opcode in ("tuple", "bitcast") and ins.operands and all(o in defs for o in ins.operands):
      return [w for o in ins.operands for w in _writes(comps, comp, defs[o], defs, depth + 1)]
    if ins.opcode == "fusion" and _called(ins) and _called(ins)[0] in comps:
      inner = comps[_called(ins)[0]]
      root = next((i for i in reversed(inner) if i.line.lstrip().startswith("ROOT")), None)
      if root is not None:
        return _writes(comps, _called(ins)[0], root, {i.name: i for i in inner}, depth + 1)
  return [float(n * b) for n, b, _ in _arrays(ins.shape)]


@dataclasses.dataclass
class OpCost:
  name: str
  opcode: str
  flops: float      # matmul FLOPs per execution
  bytes: float      # HBM bytes read + written per execution
  count: float      # executions per step
  in_loop: bool
  op_name: str

  def seconds(self, peak_flops: float, hbm_bw: float) -> float:
    """Per step, at the roofline: the slower of its matmuls at peak and its bytes at HBM bandwidth."""
    return self.count * max(self.flops / peak_flops, self.bytes / hbm_bw)


def _is_collective_fusion(comps, ins: Instr) -> bool:
  return any(i.opcode in _OPCODES for c in _called(ins) for i in comps.get(c, []))


def _op_cost(comps, comp: str, ins: Instr, defs: dict[str, Instr]) -> tuple[float, float]:
  """(matmul FLOPs, HBM bytes) of one instruction of `comp` run once."""
  operand_hbm = [_hbm(defs[o].shape) if o in defs else 0.0 for o in ins.operands]
  if ins.opcode == "fusion":
    called = _called(ins)
    inner = comps.get(called[0], []) if called else []
    params = {int(re.search(r"parameter\((\d+)\)", i.line).group(1)): i.name for i in inner if i.opcode == "parameter"}
    read = sum(_reads(comps, called[0], params[j], full) if j in params else full
               for j, full in enumerate(operand_hbm) if full)
    outs = _arrays(ins.shape)
    written = _writes(comps, comp, ins, defs)
    if len(written) != len(outs):  # unmatched structure: the whole output
      written = [float(n * b) for n, b, _ in outs]
    write = sum(w for w, (_, _, hbm) in zip(written, outs) if hbm)
    return _comp_flops(comps, called[0]) if called else 0.0, read + write
  if ins.opcode == "dynamic-update-slice":
    update = operand_hbm[1] if len(operand_hbm) > 1 else 0.0
    return 0.0, update + (_logical(defs[ins.operands[1]].shape) if _hbm(ins.shape) and ins.operands[1] in defs else 0.0)
  if ins.opcode in _SLICING or ins.opcode == "slice-start":
    out = _arrays(ins.shape)
    if ins.opcode == "slice-start":  # ((operand), result, context)
      out = _arrays(_split_shape(ins.shape[1:])[1]) if ins.shape.startswith("(") else out
    got = sum(n * b for n, b, _ in out[:1])
    return 0.0, float(got + sum(n * b for n, b, hbm in out[:1] if hbm))
  if ins.opcode == "copy-start":  # (destination, source, context): a copy between memory spaces
    dest = _arrays(ins.shape)[:1]
    return 0.0, sum(operand_hbm) + sum(n * b for n, b, hbm in dest if hbm)
  if ins.opcode == "custom-call" and 'custom_call_target="AllocateBuffer"' in ins.attrs:
    return 0.0, 0.0
  flops = _dot_flops(ins, defs) if _is_gemm(ins) else 0.0
  return flops, sum(operand_hbm) + _hbm(ins.shape)


def op_costs(text: str) -> tuple[list[OpCost], list[str]]:
  """Every instruction of compiled HLO `text` that runs as a kernel, with its matmul FLOPs and HBM
  bytes (operands read + outputs written; a fusion's operand it only slices counts the slices, a
  buffer updated in place counts the update) and how often it runs per step (loop bodies times
  their trip count, as `collectives`). Collectives are left out (`collectives` counts them)."""
  comps, entry = parse_module(text)
  out: list[OpCost] = []
  notes: list[str] = []

  def walk(comp: str, mult: float, in_loop: bool, seen: tuple[str, ...] = ()):
    if comp not in comps or comp in seen:
      return
    body = comps[comp]
    defs = {i.name: i for i in body}
    for ins in body:
      op = ins.opcode
      if op in _FREE or op in _OPCODES or op in _DONE:
        continue
      if op == "while":
        body_name, trips = _loop(ins, comps, defs, notes, "ops")
        if body_name:
          walk(body_name, mult * trips, True, seen + (comp,))
        continue
      if op in ("call", "conditional") or op.startswith("async-start"):
        for c in _callees(ins):
          walk(c, mult, in_loop, seen + (comp,))
        continue
      if op == "fusion" and _is_collective_fusion(comps, ins):
        continue
      flops, nbytes = _op_cost(comps, comp, ins, defs)
      if flops or nbytes:
        meta = re.search(r'op_name="([^"]*)"', ins.line)
        out.append(OpCost(ins.name, op, flops, nbytes, mult, in_loop, meta.group(1) if meta else ""))

  walk(entry, 1.0, False)
  return out, notes


def summarize_ops(ops: list[OpCost], peak_flops: float, hbm_bw: float, top: int = 8) -> list[dict]:
  """The memory-bound time per step grouped by where ops come from (jax's op_name without the
  innermost primitive), largest first: what keeps a step from its matmul peak."""
  rows: dict[str, dict] = {}
  for o in ops:
    t_mem, t_mxu = o.count * o.bytes / hbm_bw, o.count * o.flops / peak_flops
    if t_mem <= t_mxu:
      continue
    where = "/".join(o.op_name.split("/")[:-1]) or o.op_name or o.opcode
    r = rows.setdefault(where, dict(where=where, ops=0.0, bytes=0.0, seconds=0.0, excess=0.0))
    r["ops"] += o.count
    r["bytes"] += o.count * o.bytes
    r["seconds"] += t_mem
    r["excess"] += t_mem - t_mxu
  return sorted(rows.values(), key=lambda r: -r["excess"])[:top]
