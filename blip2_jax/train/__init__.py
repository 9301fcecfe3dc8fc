"""Training for BLIP-2: stage 1 (ITC + ITM + ITG) and stage 2 (LM) losses (`losses`) and the pieces around them."""


def recipe_module(name: str):
  """configs/<name>.py of this checkout (configs/ sits beside the blip2_jax package, as the recipes
  `python -m blip2_jax.train --config configs/<name>.py` reads); ImportError names the recipe."""
  import importlib
  import os
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if root not in sys.path and os.path.isdir(os.path.join(root, "configs")):
    sys.path.insert(0, root)
  try:
    return importlib.import_module(f"configs.{name}")
  except ImportError as e:
    raise ImportError(f"cannot import the recipe configs/{name}.py ({e}); run from a blip2-jax checkout "
                      "(pip install -e .)") from e
