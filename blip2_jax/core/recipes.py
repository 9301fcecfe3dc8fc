"""Where the training recipes come from, in a source checkout and in an installed package.

The recipes live in configs/ at the top of the repository and import their shared parts as
`from configs import common`. An installed wheel ships the same files as the package
`blip2_jax.configs` (setup.py maps it onto configs/), so there is no top-level `configs` package on
sys.path there, and a recipe file named by path (`--config /abs/path/configs/stage1.py:tiny`) may sit
anywhere. `use_configs(directory)` registers `directory` as the `configs` package before a recipe
loads, so its imports resolve to the configs/ beside it without depending on the working directory
or sys.path.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # blip2_jax/


def bundled_dir() -> str:
  """configs/ of this installation: blip2_jax/configs in an installed package, the checkout's
  top-level configs/ in a source tree (an editable install included)."""
  for d in (os.path.join(_PACKAGE, "configs"), os.path.join(os.path.dirname(_PACKAGE), "configs")):
    if os.path.isfile(os.path.join(d, "common.py")):
      return d
  raise ImportError(f"no recipes found beside {_PACKAGE} (looked for configs/common.py in the package and "
                    "in the checkout); reinstall blip2-jax")


def dir_for(recipe_path: str) -> str:
  """The configs/ a recipe file imports from: the directory it sits in when that holds the shared
  common.py (a checkout's configs/, an installed copy, an edited copy of either), else the bundled one
  (a recipe of your own elsewhere)."""
  d = os.path.dirname(os.path.abspath(recipe_path))
  return d if os.path.isfile(os.path.join(d, "common.py")) else bundled_dir()


def use_configs(directory: str):
  """Makes `import configs` (and `configs.<name>`) load from `directory`; returns the package.
  A `configs` package already loaded from elsewhere is replaced, with its submodules."""
  d = os.path.realpath(directory)
  current = sys.modules.get("configs")
  if current is not None and [os.path.realpath(p) for p in getattr(current, "__path__", [])] == [d]:
    return current
  for name in [n for n in sys.modules if n == "configs" or n.startswith("configs.")]:
    del sys.modules[name]
  init = os.path.join(d, "__init__.py")
  spec = importlib.util.spec_from_file_location("configs", init if os.path.isfile(init) else None,
                                                submodule_search_locations=[d])
  if spec is None or spec.loader is None:  # no __init__.py: a namespace-style package
    spec = importlib.machinery.ModuleSpec("configs", None, is_package=True)
    spec.submodule_search_locations = [d]
  module = importlib.util.module_from_spec(spec)
  sys.modules["configs"] = module
  if spec.loader is not None:
    spec.loader.exec_module(module)
  return module


def recipe_module(name: str):
  """configs/<name>.py of this installation (see bundled_dir); ImportError names the recipe."""
  use_configs(bundled_dir())
  try:
    return importlib.import_module(f"configs.{name}")
  except ImportError as e:
    raise ImportError(f"cannot import the recipe configs/{name}.py ({e})") from e


def prepare(config_arg: str) -> str:
  """For a `--config PATH[:ARGS]` value: makes the recipe's `from configs import ...` resolve (see
  dir_for) before ml_collections loads PATH; returns PATH."""
  path = config_arg.split(":", 1)[0]
  use_configs(dir_for(path))
  return path
