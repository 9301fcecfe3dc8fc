"""blip2-jax: BLIP-2 in JAX/Flax."""
