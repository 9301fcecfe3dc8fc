"""The package's layers: each imports only the layers below it (ARCHITECTURE.md draws the same table).

An AST scan of blip2_jax/ fails on
  - an upward import (a module importing a layer above its own),
  - an import between two different subpackages of the same layer (they would be one step from a cycle),
  - one command-line module importing another (cli/options.py is what they share),
  - a package import inside a function, unless the function imports an optional heavy dependency
    there (torch, tensorflow_datasets, matplotlib, ...) or the import sits under
    `if __name__ == "__main__":` (a `python -m` entry point).
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "blip2_jax")

# Lowest first. A module's layer is that of its subpackage (blip2_jax.<sub>...); modules directly in
# blip2_jax/ are entry points (the public face and the `python -m blip2_jax.<tool>` shims).
LAYERS = (
    ("core",),                       # naming, sharding, compile presets, progress, flops, hub, HLO, chips
    ("models",),                     # pure Flax modules + their name tables
    ("checkpoints", "decoding"),     # readers / HF / LAVIS / towers; search and per-family decode steps
    ("data", "evaluation"),          # grain pipelines, sources, transforms, processing; metrics
    ("inference",),                  # captioning, VQA, retrieval
    ("train",),                      # tasks, step, losses, optim, loop, AOT compile
    ("cli",),                        # one module per command + options.py
    ("<entry>",),                    # blip2_jax/__init__.py and the python -m shims
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules():
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        yield (rel[:-len(".__init__")] if rel.endswith(".__init__") else rel), path


def _layer(module: str) -> str:
  parts = module.split(".")
  if len(parts) == 1 or (len(parts) == 2 and not os.path.isdir(os.path.join(ROOT, parts[1]))):
    return "<entry>"
  return parts[1]


def _imports(path: str, module: str):
  """(imported blip2_jax module, line, in a function, under __main__ guard) for every package import."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  out = []

  def visit(node, in_func, in_main):
    for child in ast.iter_child_nodes(node):
      f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      m = in_main or (isinstance(child, ast.If) and ast.unparse(child.test).replace("'", '"') == '__name__ == "__main__"')
      if isinstance(child, ast.Import):
        out.extend((a.name, child.lineno, in_func, in_main) for a in child.names if a.name.startswith("blip2_jax"))
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          pkg = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
          base = ".".join(pkg[:len(pkg) - child.level + 1] + ([base] if base else []))
        if base.startswith("blip2_jax"):
          names = [f"{base}.{a.name}" for a in child.names]
          out.extend((n if _is_module(n) else base, child.lineno, in_func, in_main) for n in names)
      visit(child, f, m)

  visit(tree, False, False)
  return out


def _is_module(name: str) -> bool:
  p = os.path.join(os.path.dirname(ROOT), *name.split("."))
  return os.path.isfile(p + ".py") or os.path.isdir(p)


def _scan():
  return {m: _imports(p, m) for m, p in _modules()}


def test_every_subpackage_has_a_layer():
  subs = {d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d)) and d != "__pycache__"}
  assert subs - set(RANK) == set(), f"add these subpackages to LAYERS: {sorted(subs - set(RANK))}"


def test_no_upward_or_sideways_imports():
  bad = []
  for module, imports in _scan().items():
    src = _layer(module)
    for target, line, _, in_main in imports:
      dst = _layer(target)
      if in_main or src == dst or src == "<entry>":
        continue
      if RANK[dst] > RANK[src]:
        bad.append(f"{module}:{line} imports {target} ({dst} is above {src})")
      elif RANK[dst] == RANK[src]:
        bad.append(f"{module}:{line} imports {target} ({dst} and {src} share a layer)")
  assert not bad, "\n".join(bad)


def test_commands_do_not_import_each_other():
  bad = [f"{m}:{line} imports {t}" for m, imports in _scan().items() if m.startswith("blip2_jax.cli.")
         for t, line, _, _ in imports
         if t.startswith("blip2_jax.cli.") and t != "blip2_jax.cli.options" and t != m]
  assert not bad, "\n".join(bad)


def test_no_package_imports_inside_functions():
  bad = [f"{m}:{line} imports {t} inside a function" for m, imports in _scan().items()
         for t, line, in_func, in_main in imports if in_func and not in_main]
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", [n for names in LAYERS for n in names if n != "<entry>"])
def test_layer_exists(layer):
  assert os.path.isdir(os.path.join(ROOT, layer)), layer
