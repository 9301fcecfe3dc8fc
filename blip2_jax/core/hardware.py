"""Published per-chip figures, TPU slice names and local devices, for the ahead-of-time roofline.

Each figure is the vendor's published number for one chip, with the page it comes from. ICI
bandwidth is per chip, both directions, over all its links; `link_bw` splits it over the links
(a ring collective along one torus axis uses the two links of that axis). `--topology gpu` /
`local` compiles for the devices attached to this host instead of a TPU slice (`local_topology`).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import re

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16_flops: float        # dense bf16 FLOP/s
  hbm_bytes: float
  hbm_bw: float            # bytes/s
  ici_bw: float            # bytes/s per chip, bidirectional, all links (NVLink for GPUs)
  ici_links: int           # links per chip (TPU torus: 2 per dimension)
  source: str

  @property
  def link_bw(self) -> float:
    """Bidirectional bytes/s of one ICI link."""
    return self.ici_bw / self.ici_links


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GIB, 1200e9, 6 * 90e9, 6,
               "cloud.google.com/tpu/docs/v4 (275 TFLOP/s, 32 GiB, 1200 GB/s); ICI 90 GB/s per link both ways x 6 "
               "links: jax-ml.github.io/scaling-book/tpus"),
    "v5e": Chip("TPU v5e", 197e12, 16e9, 819e9, 400e9, 4,
                "cloud.google.com/tpu/docs/v5e (197 TFLOP/s, 16 GB, 819 GB/s, ICI 400 GB/s bidirectional, 4 ports)"),
    "v5p": Chip("TPU v5p", 459e12, 95 * GIB, 2765e9, 1200e9, 6,
                "cloud.google.com/tpu/docs/v5p (459 TFLOP/s, 95 GiB, 2765 GB/s, ICI 1200 GB/s bidirectional, 3D torus)"),
    "v6e": Chip("TPU v6e", 918e12, 32e9, 1638e9, 800e9, 4,
                "cloud.google.com/tpu/docs/v6e (918 TFLOP/s, 32 GB, 1638 GB/s, ICI 800 GB/s bidirectional, 4 ports)"),
    "h100": Chip("H100 SXM", 989e12, 80e9, 3.35e12, 900e9, 18,
                 "nvidia.com/en-us/data-center/h100 (bf16 dense 989 TFLOP/s = half the sparse 1979, 80 GB, "
                 "3.35 TB/s, NVLink 900 GB/s)"),
    "h200": Chip("H200 SXM", 989e12, 141e9, 4.8e12, 900e9, 18,
                 "nvidia.com/en-us/data-center/h200 (bf16 dense 989 TFLOP/s, 141 GB, 4.8 TB/s, NVLink 900 GB/s)"),
    "a100": Chip("A100 SXM 40GB", 312e12, 40e9, 1555e9, 600e9, 12,
                 "nvidia.com/en-us/data-center/a100 (bf16 dense 312 TFLOP/s, 40 GB HBM2 1555 GB/s, NVLink 600 GB/s)"),
}

# JAX device_kind -> CHIPS key (compile-only topology devices report these)
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
                "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
# GPU device_kind (e.g. "NVIDIA H100 80GB HBM3") -> CHIPS key: the SXM parts the table describes
# (PCIe / NVL variants differ in peak and bandwidth and are not matched)
GPU_KINDS = (("H200", "h200"), ("H100 80GB HBM3", "h100"), ("H100 SXM", "h100"), ("A100-SXM4-40GB", "a100"))
LOCAL_NAMES = ("gpu", "local")

# chips -> slice shape, as Cloud TPU lays slices out (MaxText accelerator_to_spec_map)
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}

# families whose slice names count TensorCores (2 per chip) and whose chips run as one "megacore" device
MEGACORE = ("v4", "v5p")
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str            # as given (v5p-128)
  family: str          # CHIPS key
  libtpu_name: str     # libtpu's notation (v5p:4x4x4); "local <platform>" for this host's devices
  chips: int

  @property
  def chip(self) -> Chip:
    return CHIPS[self.family]

  def kwargs(self) -> dict:
    """get_topology_desc keyword arguments: v4 / v5p chips as one device each (megacore), 4 chips per host."""
    if self.family in MEGACORE:
      return dict(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1))
    return {}


def parse_topology(name: str) -> Topology:
  """A slice by the name users rent it by (v5p-128, v5e-256 / v5litepod-256, v4-64, v6e-256) or in
  libtpu's notation (v5p:4x4x4) -> Topology; ValueError naming the problem otherwise.
  v4 / v5p names count TensorCores: v5p-128 is 64 chips (4x4x4); v5e / v6e names count chips."""
  s = name.strip().lower()
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", s)
  if m:
    family = _ALIASES.get(m.group(1), m.group(1))
    if family not in DEVICE_KINDS.values():
      raise ValueError(f"unknown TPU family {m.group(1)!r} in {name!r}; known: v4, v5e, v5p, v6e")
    dims = [int(d) for d in m.group(2).split("x")]
    if len(dims) != (3 if family in MEGACORE else 2):
      raise ValueError(f"topology {name!r}: {family} slices are {'3-D (AxBxC)' if family in MEGACORE else '2-D (AxB)'}")
    chips = 1
    for d in dims:
      chips *= d
    return Topology(name, family, f"{family}:{m.group(2)}", chips)
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", s)
  if not m:
    raise ValueError(f"topology {name!r}: expected a slice name such as v5p-128, v5e-256, v4-64, v6e-256 "
                     "(or libtpu's notation, v5p:4x4x4)")
  family, n = _ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
  if family not in DEVICE_KINDS.values():
    raise ValueError(f"unknown TPU family {m.group(1)!r} in {name!r}; known: v4, v5e (v5litepod), v5p, v6e")
  if family in MEGACORE:
    if n % 2 or n // 2 not in SHAPES_3D:
      raise ValueError(f"topology {name!r}: {family} slice names count TensorCores (2 per chip); known sizes: "
                       + ", ".join(f"{family}-{2 * c}" for c in SHAPES_3D))
    chips, shape = n // 2, SHAPES_3D[n // 2]
  else:
    if n not in SHAPES_2D:
      raise ValueError(f"topology {name!r}: known {family} sizes are " + ", ".join(f"{family}-{c}" for c in SHAPES_2D))
    chips, shape = n, SHAPES_2D[n]
  return Topology(name, family, f"{family}:" + "x".join(map(str, shape)), chips)


def topology_devices(topo: Topology) -> list:
  """The compile-only TPU devices of `topo` (needs libtpu; nothing is attached)."""
  import os

  from jax.experimental import topologies
  # libtpu lets one process per host hold the TPU; compiling touches no chip, so several may run
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topo.libtpu_name, **topo.kwargs()).devices
  if len(devices) != topo.chips:
    raise ValueError(f"libtpu gave {len(devices)} devices for {topo.libtpu_name}, expected {topo.chips} chips")
  return list(devices)


def libtpu_available() -> bool:
  try:
    from jax._src import cloud_tpu_init
    return cloud_tpu_init.get_tpu_library_path() is not None
  except (ImportError, AttributeError):  # another jax layout
    import importlib.util
    return importlib.util.find_spec("libtpu") is not None


def libtpu_requirement() -> str | None:
  """The libtpu this jax was released with, as its `jax[tpu]` extra pins it in jax's package metadata
  (e.g. "libtpu==0.0.42.*"), or None when the metadata names none."""
  try:
    from packaging.requirements import Requirement
    reqs = importlib.metadata.requires("jax") or []
  except (ImportError, importlib.metadata.PackageNotFoundError):
    return None
  for text in reqs:
    req = Requirement(text)
    if req.name.lower() == "libtpu" and (req.marker is None or req.marker.evaluate({"extra": "tpu"})):
      return f"libtpu{req.specifier}"
  return None


def libtpu_mismatch() -> str | None:
  """One line saying which libtpu to install when the installed libtpu distribution is not the one
  `libtpu_requirement` names (a plain `pip install libtpu` gives the newest, which then fails inside
  XLA after minutes of compiling, a RET_CHECK on reading the HLO back); None when it is, or when
  either is unknown."""
  want = libtpu_requirement()
  try:
    have = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None
  if want is None:
    return None
  from packaging.requirements import Requirement
  if Requirement(want).specifier.contains(have, prereleases=True):
    return None
  jax_version = importlib.metadata.version("jax")
  return (f"libtpu {have} is installed, but jax {jax_version} was released with {want} (what jax[tpu] pins; "
          f"another libtpu fails inside XLA after minutes of compiling): pip install \"{want}\" "
          f"(or pip install \"jax[tpu]=={jax_version}\")")


def is_local(name: str) -> bool:
  return name.strip().lower() in LOCAL_NAMES


def chip_for_kind(kind: str) -> str | None:
  """CHIPS key of a JAX device_kind, None when the table has no figures for it."""
  if kind in DEVICE_KINDS:
    return DEVICE_KINDS[kind]
  return next((key for needle, key in GPU_KINDS if needle.lower() in kind.lower()), None)


def local_topology(name: str, devices, chip: str | None = None) -> Topology:
  """This host's `devices` as a topology: `--topology gpu` (GPUs only) or `local` (any platform).
  The chip figures come from the devices' kind, or `chip` (a CHIPS key) when given; ValueError when
  neither names a chip of the table."""
  name = name.strip().lower()
  platform = devices[0].platform if devices else "none"
  if name == "gpu" and platform != "gpu":
    raise ValueError(f"--topology gpu: JAX sees no GPU here (platform {platform}); --topology local "
                     "compiles for this host's devices")
  kind = devices[0].device_kind if devices else ""
  family = chip.strip().lower() if chip else chip_for_kind(kind)
  if family not in CHIPS:
    raise ValueError(f"no chip figures for {kind or platform!r}" + (f" (--chip {chip!r})" if chip else "")
                     + "; name one with --chip: " + ", ".join(CHIPS))
  return Topology(name, family, f"local {platform}", len(devices))
