
"""Training for BLIP-2: stage 1 (ITC + ITM + ITG) and stage 2 (LM) losses (`losses`) and the pieces around them."""

from blip2_jax.core import recipes


def recipe_module(name: str):
  """configs/<name>.py: the checkout's configs/ (beside the blip2_jax package, as the recipes
  `python -m blip2_jax.train --config configs/<name>.py` reads) or, installed, blip2_jax/configs
  (see blip2_jax.core.recipes); ImportError names the recipe."""
  return recipes.recipe_module(name)
