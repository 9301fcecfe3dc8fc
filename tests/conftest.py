"""Test-wide setup: 8 virtual CPU devices (for mesh/sharding tests) before JAX is imported."""
import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  flags += " --xla_force_host_platform_device_count=8"
# Tiny test programs spend far more time in XLA:CPU's LLVM optimiser than running: level 0 makes
# the suite's compiles ~35% faster. The HLO (what is tested) is the same; only machine code differs.
if "xla_backend_optimization_level" not in flags:
  flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent compilation cache per test session: programs compiled again with the same HLO
# (a resumed training run, a CLI called twice) load instead of recompiling.
import tempfile  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="blip2_jax_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

import pytest  # noqa: E402

from blip2_jax.checkpoints import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
  """tiny_checkpoint(arch, family, **save_tiny_kw) -> a tiny random HF checkpoint directory, built
  once per test session and shared: tests read it and copy it before they change anything."""
  made = {}

  def get(arch: str = "Blip2ForConditionalGeneration", family: str | None = "opt", **kw) -> str:
    key = (arch, family, repr(sorted(kw.items())))
    if key not in made:
      made[key] = tiny.save_tiny(str(tmp_path_factory.mktemp("tiny")), arch, family, **kw)
    return made[key]

  return get
