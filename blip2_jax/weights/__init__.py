"""Reading and writing checkpoints: safetensors in/out, name tables, strict reports."""
from blip2_jax.weights.table import Rule, expand, prefixed, TRANSFORMS  # noqa: F401
