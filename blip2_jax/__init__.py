"""blip2-jax: BLIP-2 (Li et al. 2023) in JAX/Flax, loading and saving Hugging Face checkpoints.

    import blip2_jax
    model, params = blip2_jax.from_pretrained("Salesforce/blip2-opt-2.7b", dtype=jnp.float32)  # or a directory
    out = model.apply({"params": params}, pixel_values=x, input_ids=ids, attention_mask=mask)
"""
from blip2_jax.checkpoints.hf import from_pretrained, save_pretrained  # noqa: F401
from blip2_jax.checkpoints.io import CheckpointError  # noqa: F401
from blip2_jax.inference import generate, retrieval_scores  # noqa: F401

# (caption() and answer() live in blip2_jax.inference: `blip2_jax.cli.caption` is the captioning CLI module)

__version__ = "0.1.0"
