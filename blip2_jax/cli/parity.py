"""python -m blip2_jax.parity --hf-dir DIR [--dtype bfloat16] [--threshold 1e-4]   (installed: blip2-parity)

Compares a converted model with its PyTorch (transformers) original, stage by stage: loads the
directory with transformers (eager attention) and with blip2_jax, feeds both the same random image
and text, prints max/mean abs diff per stage (vision, Q-Former, projection, LLM logits or retrieval
scores; `blip2_jax.checkpoints.parity`) and exits with status 1 when any stage exceeds the threshold.
Needs torch and transformers (`pip install -e .[test]`).

Bad input (torch not installed, a --hf-dir that is missing, empty, not a BLIP-2 checkpoint, without
weights or with a truncated model.safetensors; a --batch below 1 or a negative --threshold; a flag
given twice) stops before anything loads: one line on stderr, exit status 2. Any other failure: one line, exit status 1 (`--debug`
shows the traceback).
"""
from __future__ import annotations

import sys
import tempfile

from blip2_jax.checkpoints import tiny
from blip2_jax.checkpoints.parity import DEFAULT_THRESHOLDS, LLM_ARCHS, TINY, compare
from blip2_jax.cli import options


def _report(title: str, rows, thr: float) -> list[str]:
  print(f"\n{title}")
  print(f"{'stage':<24} {'max abs diff':>14} {'mean abs diff':>14} {'max |torch|':>12}")
  bad = []
  for name, mx, mean, ref in rows:
    ok = mx <= thr  # False for NaN too: a NaN stage must fail, not pass
    flag = "" if ok else "  <-- above threshold"
    print(f"{name:<24} {mx:>14.3e} {mean:>14.3e} {ref:>12.3e}{flag}")
    if not ok:
      bad.append(name)
  return bad


def parser():
  p = options.Parser(prog="python -m blip2_jax.parity", description=__doc__.split("\n\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--hf-dir", help="a transformers save_pretrained directory of a BLIP-2 class, or a Hugging Face "
                   "Hub id (Salesforce/blip2-opt-2.7b) read from (or fetched into) the Hugging Face cache")
  src.add_argument("--tiny-random", choices=list(TINY) + ["all"],
                   help="build tiny random HF checkpoints locally (no download) and compare those")
  p.add_argument("--revision", default=None, help="with a Hub id as --hf-dir: its branch, tag or commit")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--threshold", type=options.nonnegative_float, default=None,
                 help="max abs diff allowed per stage (default: 1e-4 for float32, 0.15 for bfloat16)")
  p.add_argument("--batch", type=options.positive_int, default=2, help="random inputs per stage (default 2)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--scan", action="store_true", help="load with scanned layers")
  return p


def main(argv=None) -> int:
  return options.run(_main, argv)


def _main(argv) -> int:
  a = parser().parse_args(argv)
  options.require_packages({"torch": "torch"}, "python -m blip2_jax.parity (the PyTorch side of the comparison)",
                           options.TORCH_INSTALL)
  if a.hf_dir:
    hf_dir = options.model_dir(a.hf_dir, "--hf-dir", a.revision)
    cfg = options.check_checkpoint(hf_dir, flag="--hf-dir")
    if options.architecture(cfg) in LLM_ARCHS and cfg.get("image_token_index", cfg.get("image_token_id")) is None:
      raise options.UsageError(f"--hf-dir {a.hf_dir}: config.json sets no image_token_index: transformers 5 then "
                               "never inserts the query outputs, so there is nothing to compare the LLM against")
  thr = a.threshold if a.threshold is not None else DEFAULT_THRESHOLDS[a.dtype]
  if a.hf_dir:
    runs = [(a.hf_dir, hf_dir)]
    tmp = None
  else:
    tmp = tempfile.TemporaryDirectory()
    import transformers  # optional dependency (the test extras), as in compare
    transformers.utils.logging.disable_progress_bar()
    names = list(TINY) if a.tiny_random == "all" else [a.tiny_random]
    runs = []
    for n in names:
      arch, family = TINY[n]
      d = tiny.save_tiny(f"{tmp.name}/{n}", arch, family, seed=a.seed)
      runs.append((f"tiny random {n} ({arch})", d))
  bad = []
  try:
    for title, d in runs:
      rows = compare(d, a.dtype, a.batch, a.seed, a.scan)
      bad += [f"{title}: {b}" for b in _report(f"{title} [{a.dtype}]", rows, thr)]
  finally:
    if tmp is not None:
      tmp.cleanup()
  if bad:
    print(f"\nFAIL above {thr:g}: " + "; ".join(bad))
    return 1
  print(f"\nOK: every stage within {thr:g} ({a.dtype})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
