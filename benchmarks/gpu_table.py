"""The table of benchmarks/gpu_suite.sh, from the JSON files its parts wrote.

    python benchmarks/gpu_table.py WORKDIR [--out FILE]

WORKDIR holds status.tsv (part, exit status, seconds, budget) and each part's JSON:
train_*.json (benchmarks/train_step.py --json), generation.json (benchmarks/generation.py --json),
aot_*.json (python -m blip2_jax.aot --json). A part that failed, timed out or never ran is listed
with its status; its rows are whatever it wrote before it stopped. Standard library only, so the
table prints even when JAX or torch do not import.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

GIB = 2 ** 30


def _load(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _f(x, fmt="{:.1f}", scale=1.0):
  return "-" if x is None else fmt.format(x * scale)


def status_rows(work: str) -> list[str]:
  out = ["| part | status | seconds (budget) |", "| --- | --- | --- |"]
  try:
    with open(os.path.join(work, "status.tsv")) as f:
      lines = [x.rstrip("\n").split("\t") for x in f if x.strip()]
  except OSError:
    lines = []
  for name, rc, secs, budget in lines:
    what = {"0": "ok", "124": "timed out", "137": "killed (timeout)", "skipped": "skipped: no time left"}.get(
        rc, f"failed (exit {rc})")
    out.append(f"| {name} | {what} | {secs} ({budget}) |")
  return out


def _step_name(d) -> str:
  if d["stage"] == 1:
    return "stage 1 (ViT-g + Q-Former)" if d["size"] != "small" else "stage 1 (small)"
  llm = {"real": {"opt": "OPT-2.7B", "t5": "FlanT5-XL"}, "opt6.7b": {"opt": "OPT-6.7B"}}.get(d["size"], {})
  return f"stage 2 ({llm.get(d['family'], d['family'] + ', small')})"


def _header(head: str) -> list[str]:
  """A markdown table's head row and its separator."""
  return [head, "|" + " --- |" * (head.count("|") - 1)]


def _reports(work: str, pattern: str):
  """The readable JSON reports of WORK matching `pattern`, in name order (a part's own order)."""
  for path in sorted(glob.glob(os.path.join(work, pattern))):
    d = _load(path)
    if d:
      yield d


def train_rows(work: str) -> list[str]:
  out = _header("| step | batch | ours img/s | ours TFLOP/s | ours MFU | ours peak GiB | PyTorch img/s | "
                "PyTorch TFLOP/s | PyTorch MFU | PyTorch peak GiB | ours / PyTorch | estimate ms (measured ms) |")
  for d in _reports(work, "train_*.json"):
    for r in d.get("rows", []):
      est = r.get("estimate") or {}
      ratio = r["ours"] / r["torch"] if r.get("torch") else None
      out.append(" | ".join([
          f"| {_step_name(d)}", str(r["batch"]), _f(r.get("ours")), _f(r.get("ours_tflops")),
          _f(r.get("mfu"), "{:.1f}%", 100), _f(r.get("ours_peak"), "{:.1f}", 1 / GIB), _f(r.get("torch")),
          _f(r.get("torch_tflops")), _f(r.get("torch_mfu"), "{:.1f}%", 100), _f(r.get("torch_peak"), "{:.1f}", 1 / GIB),
          _f(ratio, "{:.2f}"),
          f"{_f(est.get('step_s'), '{:.1f}', 1e3)} ({_f(r.get('ours_s'), '{:.1f}', 1e3)})" + " |"]))
  return out


def generation_rows(work: str) -> list[str]:
  d = _load(os.path.join(work, "generation.json"))
  if not d:
    return []
  impls = d.get("attn", [])
  head = "| batch | beams | ours tok/s | " + " | ".join(f"HF {i} tok/s | ours / HF {i}" for i in impls) + \
      " | ours first call s |"
  out = [f"{d['size']} {d['family']}, {d['dtype']}, {d['new_tokens']} new tokens:", "", *_header(head)]
  for r in d["rows"]:
    cells = [str(r["batch"]), str(r["beams"]), _f(r.get("ours"))]
    for i in impls:
      hf = r.get(f"hf_{i}")
      cells += [_f(hf), _f(r["ours"] / hf if hf else None, "{:.2f}")]
    cells.append(_f(r.get("first")))
    out.append("| " + " | ".join(cells) + " |")
  return out


def aot_rows(work: str) -> list[str]:
  out = _header("| recipe | batch | chip | peak memory (compiled) | estimate: step ms (ops / HBM / matmuls) | "
                "MFU estimate | measured step ms | measured MFU | measured peak GiB | estimate / measured |")
  for d in _reports(work, "aot_*.json"):
    rf, m, ops = d["roofline"], d.get("measured") or {}, d.get("ops") or {}
    step = m.get("step_s")
    mfu = d["model_flops"] / d["devices"] / (step * d["peak_flops"]) if step and d.get("peak_flops") else None
    out.append(" | ".join([
        f"| {d['recipe']}", str(d["global_batch"]), d["chip"], f"{d['memory']['peak'] / GIB:.1f} GiB",
        f"{rf['serial_s'] * 1e3:.1f} ({rf['ops_s'] * 1e3:.1f} / {rf['memory_s'] * 1e3:.1f} / "
        f"{rf['compute_s'] * 1e3:.1f})", f"{100 * rf['mfu_serial']:.1f}%", _f(step, "{:.1f}", 1e3),
        _f(mfu, "{:.1f}%", 100), _f(m.get("peak"), "{:.1f}", 1 / GIB),
        _f(rf["serial_s"] / step if step else None, "{:.2f}") + " |"]))
    if not ops:
      out[-1] += " (no HBM term)"
  return out


def table(work: str) -> str:
  meta = _load(os.path.join(work, "meta.json")) or {}
  lines = [f"## GPU suite ({meta.get('mode', '?')}): {meta.get('device', '?')}, {meta.get('date', '?')}", ""]
  lines += status_rows(work) + [""]
  lines += ["Train steps: ours (the project's step) and PyTorch (HF modules + LAVIS losses) on the same random "
            "weights and batch; estimate = the roofline of ours' compiled step on the device's published figures.",
            ""] + train_rows(work) + [""]
  gen = generation_rows(work)
  if gen:
    lines += ["Captioning (blip2_jax.generate against HF `generate`):", ""] + gen + [""]
  lines += ["AOT tool on this device (`python -m blip2_jax.aot --topology gpu --run N`: the recipe's own step, "
            "estimate from its compiled program, then timed on random weights and data):", ""] + aot_rows(work)
  return "\n".join(lines) + "\n"


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("work")
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  text = table(a.work)
  print(text)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
