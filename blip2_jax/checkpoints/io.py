"""Checkpoint I/O: a zero-copy safetensors reader/writer (bf16 included), torch `.bin`/`.pth`
reading for LAVIS, and strict table-driven loading that reports every problem at once.

Loading never materialises the whole checkpoint: each target leaf is read (memory-mapped),
transformed, and placed straight into its target sharding with `make_array_from_callback`.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from blip2_jax.core.naming import TRANSFORMS, Rule, expand
from blip2_jax.core.sharding import param_shardings


class CheckpointError(ValueError):
  """A checkpoint cannot be read or does not fit the model; the message lists every problem."""


# ----------------------------------------------------------------------------------------
# safetensors

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _read_header(path: str) -> tuple[dict, int]:
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError("file shorter than the 8-byte header length")
      (n,) = struct.unpack("<Q", raw)
      if n > size - 8 or n > 100 * 2**20:
        raise ValueError(f"header length {n} does not fit a file of {size} bytes")
      header = json.loads(f.read(n))
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path} is not a readable safetensors file: the header is not a JSON object")
  for k, v in header.items():
    if k == "__metadata__":
      continue
    try:
      begin, end = (int(x) for x in v["data_offsets"])
      shape, dt = [int(d) for d in v["shape"]], v["dtype"]
    except (TypeError, ValueError, KeyError) as e:
      raise CheckpointError(f"{path} is corrupt: bad header entry for tensor {k!r}: {v!r} ({e})") from None
    if dt not in _ST_DTYPES:
      raise CheckpointError(f"{path}: tensor {k!r} has unsupported dtype {dt}")
    if end > size - 8 - n:
      raise CheckpointError(f"{path} is truncated or corrupt: tensor {k!r} ends at byte {end} "
                            f"but the file holds {size - 8 - n} data bytes")
    want = int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_DTYPES[dt]).itemsize
    if not 0 <= begin <= end or end - begin != want:
      raise CheckpointError(f"{path} is corrupt: tensor {k!r} of shape {tuple(shape)} {dt} needs {want} "
                            f"bytes but its header gives offsets [{begin}, {end})")
  return header, 8 + n


class SafetensorsReader:
  """Reads one `.safetensors` file, a sharded set (index json), or a directory holding either."""

  def __init__(self, path: str):
    self.path = path
    files = self._files(path)
    self._where: dict[str, tuple[str, dict, int]] = {}
    self._maps: dict[str, np.memmap] = {}
    for f in files:
      header, start = _read_header(f)
      for k, v in header.items():
        if k != "__metadata__":
          self._where[k] = (f, v, start)

  @staticmethod
  def _files(path: str) -> list[str]:
    if os.path.isdir(path):
      index = os.path.join(path, INDEX_NAME)
      single = os.path.join(path, WEIGHTS_NAME)
      if os.path.exists(index):
        path = index
      elif os.path.exists(single):
        return [single]
      else:
        others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if others:
          return [os.path.join(path, f) for f in others]
        raise CheckpointError(
            f"{path} holds no {WEIGHTS_NAME} or {INDEX_NAME} (found: {sorted(os.listdir(path))}); "
            "save the model with save_pretrained(..., safe_serialization=True)")
    if path.endswith(".json"):
      try:
        with open(path) as f:
          weight_map = json.load(f)["weight_map"]
        names = set(weight_map.values())
      except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors index: {e!r}") from None
      root = os.path.dirname(path)
      files = sorted(os.path.join(root, v) for v in names)
      missing = [f for f in files if not os.path.exists(f)]
      if missing:
        raise CheckpointError(f"{path} names shard files that do not exist: {missing}")
      return files
    if not os.path.exists(path):
      raise CheckpointError(f"checkpoint {path} does not exist")
    return [path]

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._where[key][1]["shape"])

  def get(self, key: str) -> np.ndarray:
    f, info, start = self._where[key]
    if f not in self._maps:
      self._maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
    begin, end = info["data_offsets"]
    buf = self._maps[f][start + begin:start + end]
    return buf.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


class TorchReader:
  """Reads a torch pickle (`pytorch_model.bin`, LAVIS `.pth`); tensors become float32/int numpy."""

  def __init__(self, path: str, state_dict: Mapping | None = None):
    self.path = path
    if state_dict is None:
      import torch  # only needed for torch pickles
      try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
      except Exception as e:  # torch raises many types for bad pickles
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from None
      state_dict = obj.get("model", obj) if isinstance(obj, dict) else obj
      if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    self._sd = dict(state_dict)

  def keys(self):
    return list(self._sd)

  def __contains__(self, key):
    return key in self._sd

  def shape(self, key):
    return tuple(self._sd[key].shape)

  def get(self, key):
    t = self._sd[key]
    if hasattr(t, "detach"):
      import torch
      t = t.detach()
      t = t.float() if t.dtype in (torch.bfloat16, torch.float16) else t
      return t.numpy()
    return np.asarray(t)


class DictReader(TorchReader):
  """A reader over an in-memory {name: array} mapping (renamed LAVIS dicts, tests)."""

  def __init__(self, tensors: Mapping, path: str = "<memory>"):
    super().__init__(path, tensors)


def open_checkpoint(path: str):
  if os.path.isfile(path) and path.endswith((".bin", ".pth", ".pt")):
    return TorchReader(path)
  if os.path.isdir(path) and not any(
      f.endswith(".safetensors") or f == INDEX_NAME for f in os.listdir(path)):
    if os.path.exists(os.path.join(path, "pytorch_model.bin")):
      return TorchReader(os.path.join(path, "pytorch_model.bin"))
  return SafetensorsReader(path)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset, arrays = 0, []
  for k, v in tensors.items():
    v = np.asarray(v, order="C")  # not ascontiguousarray: it turns 0-d scalars into shape (1,)
    if v.dtype not in _ST_NAMES:
      raise ValueError(f"cannot write tensor {k!r} of dtype {v.dtype} to safetensors")
    header[k] = {"dtype": _ST_NAMES[v.dtype], "shape": list(v.shape),
                 "data_offsets": [offset, offset + v.nbytes]}
    offset += v.nbytes
    arrays.append(v)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for v in arrays:
      f.write(v.tobytes())
  os.replace(tmp, path)  # never leave a half-written file under the final name


def save_state_dict(directory: str, tensors: Mapping[str, np.ndarray],
                    max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes model.safetensors, or shards plus model.safetensors.index.json as HF does."""
  os.makedirs(directory, exist_ok=True)
  shards, cur, size = [], {}, 0
  for k, v in tensors.items():
    nbytes = np.asarray(v).nbytes
    if cur and size + nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = {}, 0
    cur[k] = v
    size += nbytes
  shards.append(cur)
  if len(shards) == 1:
    write_safetensors(os.path.join(directory, WEIGHTS_NAME), shards[0])
    names = [WEIGHTS_NAME]
  else:
    names, weight_map = [], {}
    for n, shard in enumerate(shards):
      name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
      write_safetensors(os.path.join(directory, name), shard)
      names.append(name)
      weight_map.update({k: name for k in shard})
    total = sum(np.asarray(v).nbytes for v in tensors.values())
    tmp = os.path.join(directory, INDEX_NAME + ".tmp")
    with open(tmp, "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    os.replace(tmp, os.path.join(directory, INDEX_NAME))
    names.append(INDEX_NAME)
  # Weights of an earlier save into the same directory would shadow these (an index is read
  # before model.safetensors) or mix into them; remove them, as transformers does.
  for f in os.listdir(directory):
    if f not in names and _OUR_WEIGHT_FILES.fullmatch(f):
      os.remove(os.path.join(directory, f))
  return names


def save_hf_directory(path: str, tensors: Mapping[str, np.ndarray], hf_config, *, dtype=None,
                      max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `tensors` (`save_state_dict`) and `hf_config` (a transformers config: config.json) to
  `path`. config.json records the weights' dtype as transformers does (used by dtype="auto"): `dtype`
  when given, else that of the largest floating tensor (a bf16 load keeps an fp32 Q-Former)."""
  save_state_dict(path, tensors, max_shard_bytes=max_shard_bytes)
  floats = [v for v in tensors.values() if jnp.issubdtype(v.dtype, jnp.floating)]
  if floats:
    hf_config.dtype = jnp.dtype(dtype).name if dtype is not None else max(floats, key=lambda v: v.size).dtype.name
  hf_config.save_pretrained(path)


_OUR_WEIGHT_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


# ----------------------------------------------------------------------------------------
# tree paths


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    p = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, p + "/"))
    else:
      out[p] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


_SCANNED = re.compile(r"(^|/)layers(/|$)")


def _sources(path: str, shape: tuple[int, ...]) -> tuple[list[str], tuple[int, ...]]:
  """Unrolled paths feeding one (possibly scanned) leaf, and the per-layer shape."""
  if not _SCANNED.search(path):
    return [path], shape
  n = shape[0]
  return [_SCANNED.sub(lambda m: f"{m.group(1)}layers_{i}{m.group(2)}", path, count=1)
          for i in range(n)], shape[1:]


def init_params(module: nn.Module, seed: int, *args, **kwargs):
  """Unboxed `module.init(PRNGKey(seed), *args)['params']` as one compiled program: run eagerly,
  flax's init dispatches (and compiles) every op on its own: 16 s against 3 s for the tiny
  stage-1 model on a 2-core CPU."""
  return jax.jit(lambda rng, a, kw: nn.unbox(module.init(rng, *a, **kw)["params"]))(
      jax.random.PRNGKey(seed), args, kwargs)


def abstract_params(module: nn.Module, *args, **kwargs):
  """Boxed (logically partitioned) ShapeDtypeStructs of `module.init(rng, *args)['params']`."""
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]


def load_params(source, rules: Sequence[Rule], abstract, *, mesh=None, axis_rules=None,
                dtype=None, ignore: Iterable[str] = (), name: str | None = None) -> dict:
  """Loads the leaves of `abstract` (from `abstract_params`) from a checkpoint via `rules`.

  Every missing, unexpected or mis-shaped tensor is collected and raised in ONE CheckpointError.
  `ignore` holds regexes of HF keys that may be present without a rule (buffers, tied heads).
  `dtype` overrides the stored parameter dtype (floating leaves only).
  """
  reader = open_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
  name = name or getattr(reader, "path", "checkpoint")
  shardings = None
  if mesh is not None:
    shardings = flatten(param_shardings(abstract, mesh, axis_rules or ()))
  leaves = flatten(nn.unbox(abstract))
  by_flax = {r.flax: r for r in expand(rules)}
  used, missing, misshaped, no_rule = set(), [], [], []
  plan = {}
  for path, leaf in leaves.items():
    srcs, shape = _sources(path, tuple(leaf.shape))
    for s in srcs:
      rule = by_flax.get(s)
      if rule is None:
        no_rule.append(s)
        continue
      used.add(rule.hf)
      expected = TRANSFORMS[rule.transform][1](np.broadcast_to(np.zeros((), np.float32), shape)).shape
      if rule.hf not in reader:
        missing.append(f"{rule.hf} (expected shape {tuple(expected)})")
      elif tuple(reader.shape(rule.hf)) != tuple(expected):
        misshaped.append(f"{rule.hf}: expected {tuple(expected)}, found {tuple(reader.shape(rule.hf))}")
    plan[path] = srcs
  ign = [re.compile(p) for p in ignore]
  unexpected = sorted(k for k in reader.keys()
                      if k not in used and not any(p.fullmatch(k) for p in ign))
  problems = []
  if no_rule:
    problems.append(f"{len(no_rule)} parameters have no rule in the name table (a bug in "
                    f"blip2_jax, please report): " + ", ".join(no_rule[:20]))
  if missing:
    problems.append(f"{len(missing)} missing tensors:\n  " + "\n  ".join(missing))
  if misshaped:
    problems.append(f"{len(misshaped)} tensors with the wrong shape:\n  " + "\n  ".join(misshaped))
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected tensors (not used by this model):\n  "
                    + "\n  ".join(unexpected[:50]) + ("\n  ..." if len(unexpected) > 50 else ""))
  if problems:
    raise CheckpointError(f"{name} does not match the model:\n" + "\n".join(problems))

  out = {}
  for path, leaf in leaves.items():
    srcs = plan[path]
    target_dtype = leaf.dtype
    if dtype is not None and jnp.issubdtype(leaf.dtype, jnp.floating):
      target_dtype = jnp.dtype(dtype)
    # Memory-mapped views (transposes are views too): nothing is read until sliced.
    views = [TRANSFORMS[by_flax[s].transform][0](reader.get(by_flax[s].hf)) for s in srcs]
    scanned = not (len(views) == 1 and srcs[0] == path)
    if shardings is not None:
      out[path] = jax.make_array_from_callback(
          tuple(leaf.shape), shardings[path],
          lambda idx, v=views, sc=scanned, sh=tuple(leaf.shape), t=target_dtype: _read_slice(v, sc, sh, idx, t))
    else:
      host = np.stack(views) if scanned else views[0].reshape(leaf.shape)
      out[path] = jnp.asarray(np.asarray(host, dtype=target_dtype))
  return unflatten(out)


def _read_slice(views, scanned: bool, shape, idx, dtype) -> np.ndarray:
  """One device's block of a leaf, read from the checkpoint views only.

  A scanned leaf is stacked from the layers the block covers, so no device (and not the host)
  ever holds the whole leaf. The result is always a fresh array: on CPU, JAX would otherwise
  alias the memory map, and rewriting the checkpoint file in place would change (or crash) the
  loaded parameters."""
  if scanned:
    layers = range(shape[0])[idx[0]]
    block = np.stack([views[i].reshape(shape[1:])[idx[1:]] for i in layers])
  else:
    block = views[0].reshape(shape)[idx]
  return np.array(block, dtype=dtype, copy=True)


def to_state_dict(params: Mapping, rules: Sequence[Rule], dtype=None) -> dict[str, np.ndarray]:
  """Flax params (scanned or unrolled, boxed or not) -> HF state dict via the same rules.

  `dtype` casts floating tensors only. Raises ValueError when a parameter has no rule or a rule's
  parameter is absent (the saved checkpoint would silently lack that tensor)."""
  flat = flatten(nn.unbox(params))
  by_flax = {r.flax: r for r in expand(rules)}
  out, no_rule, seen = {}, [], set()
  for path, value in flat.items():
    value = np.asarray(jax.device_get(value))
    srcs, _ = _sources(path, value.shape)
    for i, s in enumerate(srcs):
      rule = by_flax.get(s)
      if rule is None:
        no_rule.append(s)
        continue
      seen.add(s)
      v = value[i] if srcs[0] != path else value
      v = TRANSFORMS[rule.transform][1](v)
      if dtype is not None and jnp.issubdtype(v.dtype, jnp.floating):
        v = v.astype(dtype)
      out[rule.hf] = np.asarray(v, order="C")  # not ascontiguousarray: it turns 0-d scalars into (1,)
  absent = [f for f in by_flax if f not in seen]
  if no_rule or absent:
    raise ValueError("params do not match the name table: "
                     + (f"{len(no_rule)} without a rule: {', '.join(no_rule[:20])}. " if no_rule else "")
                     + (f"{len(absent)} rules without a parameter: {', '.join(absent[:20])}" if absent else ""))
  return out


def has_lm_head(source, prefix: str = "") -> bool:
  """Whether a checkpoint (path or reader) holds a separate `{prefix}lm_head.weight`: transformers 5
  unties a T5 head exactly then, whatever config.json says."""
  reader = open_checkpoint(source) if isinstance(source, (str, bytes, os.PathLike)) else source
  return f"{prefix}lm_head.weight" in reader
