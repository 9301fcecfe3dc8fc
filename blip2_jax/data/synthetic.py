"""Procedurally generated scenes with compositional captions: data that needs no download.

Each scene holds `count` outlined shapes of one colour in one quadrant of a plain background, and its caption
names all four attributes: "two red circles at the top left". Scenes are a pure function of
(seed, index), so the source is random-access and every process / epoch sees the same images.

Shapes sit in the cells of a GRID x GRID grid, one shape centred in each cell it uses; a quadrant is
GRID / 2 x GRID / 2 cells. The shapes gather in the corner their caption names: the first in the
quadrant's corner cell, a second beside it (across or down, at random), a third in the other cell
beside it. With the demo ViT's patches one quadrant wide (64 px images, 32 px patches), count, colour
and shape are what one patch shows, and so is position: which corner of the patch its shapes fill
(besides which patch shows them, which the model reads far less readily).

Held-out combinations measure generalisation rather than memorisation: `split="train"` never
shows the (colour, shape) pairs in `HELD_OUT`, `split="test"` shows only them, so a model that
captions or retrieves test scenes correctly has composed attributes it saw separately.

    src = ShapesSource(1000, split="train", seed=0)   # src[i] -> {"image": uint8 (S, S, 3), "caption": str, ...}
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
# position -> its quadrant (column, row), in halves of the image
POSITIONS = {"at the top left": (0, 0), "at the top right": (1, 0), "at the bottom left": (0, 1),
             "at the bottom right": (1, 1)}
GRID = 4        # cells per side; a quadrant is GRID // 2 cells per side, so holds up to 4 shapes
RADIUS = 0.12   # shape radius, a fraction of the image side (0.48 of a cell at GRID 4: shapes never touch)
# every shape's 1 px outline, whatever its fill: the outline shows the shape in pixels no colour
# changes, so a model can tell a red circle without having seen one (demo, held-out pairs)
OUTLINE = (40, 40, 40)
HELD_OUT = (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"))
SPLIT_SALT = {"train": 0, "test": 1}


def caption_of(count: str, color: str, shape: str, position: str) -> str:
  return f"{count} {color} {shape}{'' if count == 'one' else 's'} {position}"


def _combos(split: str) -> list[tuple[str, str]]:
  pairs = [(c, s) for c in COLORS for s in SHAPES]
  if split == "train":
    return [p for p in pairs if p not in HELD_OUT]
  if split == "test":
    return list(HELD_OUT)
  if split == "all":
    return pairs
  raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")


def cells(position: str) -> list[tuple[int, int]]:
  """The grid cells (column, row) of `position`'s quadrant."""
  qx, qy = POSITIONS[position]
  half = GRID // 2
  return [(qx * half + i, qy * half + j) for j in range(half) for i in range(half)]


def corner_cells(position: str, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
  """The `count` cells (column, row) `position`'s shapes take: its quadrant's corner cell first, then
  the two cells beside it in a random order (never the cell diagonal to the corner)."""
  qx, qy = POSITIONS[position]
  half = GRID // 2
  x0, y0 = qx * (GRID - 1), qy * (GRID - 1)        # the image corner's cell
  dx, dy = (1 if qx == 0 else -1), (1 if qy == 0 else -1)
  beside = [(x0 + dx * i, y0) for i in range(1, half)] + [(x0, y0 + dy * j) for j in range(1, half)]
  beside = [beside[k] for k in rng.permutation(len(beside))]
  return [(x0, y0), *beside][:count]


def render(count: str, color: str, shape: str, position: str, *, size: int = 64,
           rng: np.random.Generator | None = None) -> np.ndarray:
  """(size, size, 3) uint8 scene: `count` shapes of `color` outlined in OUTLINE, each centred in its
  own cell of `position`'s quadrant and gathered in its corner (`corner_cells`), so a caption's count
  and position are what the image shows."""
  from PIL import Image, ImageDraw
  rng = rng or np.random.default_rng(0)
  bg = tuple(int(v) for v in rng.integers(225, 250, 3))
  im = Image.new("RGB", (size, size), bg)
  draw = ImageDraw.Draw(im)
  step, r = size / GRID, size * RADIUS
  fill = tuple(int(np.clip(v + d, 0, 255)) for v, d in zip(COLORS[color], rng.integers(-15, 16, 3)))
  for col, row in corner_cells(position, COUNTS.index(count) + 1, rng):
    cx, cy = (col + 0.5) * step, (row + 0.5) * step
    if shape == "circle":
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=OUTLINE)
    elif shape == "square":
      draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill, outline=OUTLINE)
    else:
      draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill, outline=OUTLINE)
  return np.asarray(im)


class ShapesSource:
  """Random-access source of `num_records` scenes (`len`, `[i]`), deterministic in (seed, split, i).

  Records: {"image": uint8 (size, size, 3), "caption": str, "count", "color", "shape", "position"}.
  """

  def __init__(self, num_records: int, *, split: str = "train", seed: int = 0, size: int = 64):
    if num_records < 1:
      raise ValueError(f"num_records must be positive, got {num_records}")
    self.num_records, self.split, self.seed, self.size = int(num_records), split, int(seed), int(size)
    self.combos = _combos(split)

  def __len__(self) -> int:
    return self.num_records

  def attributes(self, index: int) -> dict:
    rng = self._rng(index)
    color, shape = self.combos[int(rng.integers(len(self.combos)))]
    return {"count": COUNTS[int(rng.integers(3))], "color": color, "shape": shape,
            "position": list(POSITIONS)[int(rng.integers(len(POSITIONS)))]}

  def _rng(self, index: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, SPLIT_SALT.get(self.split, 2), int(index)])

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_records:
      raise IndexError(f"index {index} out of range for {self.num_records} scenes")
    a = self.attributes(index)
    rng = self._rng(index)
    rng.integers(1 << 30, size=4)  # skip the draws `attributes` made
    img = render(a["count"], a["color"], a["shape"], a["position"], size=self.size,
                 rng=np.random.default_rng([self.seed, 7, SPLIT_SALT.get(self.split, 2), int(index)]))
    return {"image": img, "caption": caption_of(**a), **a}


def all_captions() -> list[str]:
  """Every caption a scene can have (count x colour x shape x position)."""
  return [caption_of(n, c, s, p) for n in COUNTS for c in COLORS for s in SHAPES for p in POSITIONS]


def vocabulary() -> list[str]:
  """Every word a caption can use (for tiny word-level tokenizers)."""
  words = set(COUNTS) | set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES}
  for p in POSITIONS:
    words |= set(p.split())
  return sorted(words)


# ----------------------------------------------------------------------------------------
# annotation files of scenes, for the command lines' tests and examples


SHAPES_QUESTIONS = (("what color are the shapes ?", "color"), ("how many shapes are there ?", "count"),
                    ("what shape is in the picture ?", "shape"))
SHAPES_INSTRUCTIONS = (("name the color of the shapes .", "color"), ("count the shapes .", "count"),
                       ("name the shape .", "shape"))


def write_shapes_dataset(root: str, name: str, task: str, num_records: int, *, seed: int = 0, size: int = 64,
                         split: str = "all") -> str:
  """A small fine-tuning dataset of generated scenes: PNGs in ROOT/images/NAME_i.png and ROOT/NAME.jsonl
  in the `python -m blip2_jax.finetune` format (image paths relative to ROOT/images), one record per
  scene: task "caption" ({"image", "caption"}), "vqa" ({"image", "question", "answers"}: ten answers as
  VQAv2, nine right and one a random colour / count / shape, so answer sampling sees annotator noise)
  or "instruct" ({"image", "instruction", "response"}). Questions cycle through colour, count and shape.
  Returns the JSONL path."""
  src = ShapesSource(num_records, split=split, seed=seed, size=size)
  choices = {"color": list(COLORS), "count": list(COUNTS), "shape": list(SHAPES)}
  rng = np.random.default_rng([seed, 99])
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  path = os.path.join(root, f"{name}.jsonl")
  with open(path, "w") as f:
    for i in range(num_records):
      r = src[i]
      image = f"{name}_{i}.png"
      Image.fromarray(r["image"]).save(os.path.join(root, "images", image))
      if task == "caption":
        rec = {"image": image, "caption": r["caption"]}
      elif task == "vqa":
        q, attr = SHAPES_QUESTIONS[i % len(SHAPES_QUESTIONS)]
        noise = str(rng.choice(choices[attr]))
        rec = {"image": image, "question": q, "answers": [r[attr]] * 9 + [noise], "question_id": i}
      elif task == "instruct":
        ins, attr = SHAPES_INSTRUCTIONS[i % len(SHAPES_INSTRUCTIONS)]
        rec = {"image": image, "instruction": ins, "response": r[attr]}
      else:
        raise ValueError(f"task must be caption, vqa or instruct, got {task!r}")
      f.write(json.dumps(rec) + "\n")
  return path
