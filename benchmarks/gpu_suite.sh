#!/usr/bin/env bash
# The GPU table of benchmarks/RESULTS.md in one call of at most 10 minutes on one H100 / H200:
#
#   bash benchmarks/gpu_suite.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_suite.sh --dry-run    # any machine, small sizes on the CPU (or SIZE=small)
#
# Parts, most important first, each under `timeout` with its own budget (seconds left over by a part
# go to the next ones; TOTAL caps them all):
#   1. stage-1 step, ViT-g + BERT-base Q-Former, 224 px, two batch sizes: ours against PyTorch (HF
#      modules + LAVIS losses) on the same weights: images/s, TFLOP/s, MFU, peak memory, and the
#      roofline estimate of ours' compiled step (benchmarks/train_step.py)
#   2. the AOT tool on this GPU: the stage-1 recipe's own step compiled for it, its estimate, then
#      timed on random weights and data (python -m blip2_jax.aot --topology gpu --run 3)
#   3. stage 2 with OPT-2.7B, two batch sizes, as 1
#   4. captioning tokens/s against HF `generate`, batch 1 and 16, greedy and beam 5, bf16
#   5. stage 2 with FlanT5-XL, two batch sizes, as 1
#   6. stage 2 with OPT-6.7B at batch 64: compiled and measured peak memory (the AOT tool, --run 1)
# A part that fails or runs out of time is listed as such and the others still run. The table goes
# to stdout and, when $OUT is set, to $OUT/gpu_suite.md with every part's log and JSON beside it.
# Environment: TOTAL (default 570 s), PYTHON, S1_BATCHES / S2_BATCHES ("32 64"), WORK (scratch dir).
set -u
cd "$(dirname "$0")/.."

MODE=gpu
if [ "${1:-}" = "--dry-run" ] || [ "${SIZE:-}" = "small" ]; then
  MODE=dry
fi
PY=${PYTHON:-python}
TOTAL=${TOTAL:-570}
WORK=${WORK:-$(mktemp -d -t gpu_suite.XXXXXX)}
mkdir -p "$WORK"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
# ours and PyTorch share one GPU in one process: JAX allocates as it goes instead of taking 75% first
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the random models are written and read back once per part: in memory where there is room
if [ "$MODE" = gpu ] && [ -w /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR==2 {print $4}')" -gt 40000000 ]; then
  export TMPDIR=/dev/shm
fi

START=$(date +%s)
SLACK=0
: > "$WORK/status.tsv"

# run_part NAME BUDGET CMD...: runs CMD under timeout (BUDGET plus what earlier parts left over, at most
# what TOTAL leaves), its output in WORK/NAME.log; records NAME, exit status, seconds, budget
run_part() {
  local name=$1 budget=$2
  shift 2
  local now left t rc t0
  now=$(date +%s)
  left=$((START + TOTAL - now))
  t=$((budget + SLACK))
  [ "$t" -gt "$left" ] && t=$left
  if [ "$t" -lt 20 ]; then
    printf '%s\tskipped\t0\t%s\n' "$name" "$budget" >> "$WORK/status.tsv"
    echo "== $name: skipped (no time left)"
    return
  fi
  echo "== $name (up to ${t}s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  local used=$(($(date +%s) - t0))
  SLACK=$((t - used))
  [ "$SLACK" -lt 0 ] && SLACK=0
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$used" "$budget" >> "$WORK/status.tsv"
  grep -v -e '^W[0-9]' -e 'Writing model shards' "$WORK/$name.log" | tail -n 4
  echo "== $name: exit $rc after ${used}s"
}

if [ "$MODE" = gpu ]; then
  S1=${S1_BATCHES:-32 64}
  S2=${S2_BATCHES:-32 64}
  AOT_B=${S1##* }   # the AOT tool compiles the stage-1 recipe at the larger stage-1 batch
  TRAIN="benchmarks/train_step.py --size real --scan --remat none --text-len 32 --repeats 3"
  GEN="--size real --batch 1 16 --beams 1 5 --dtype bfloat16 --attn sdpa --new-tokens 30 --repeats 3 --scan"
  AOT="-m blip2_jax.aot --topology gpu"
  S1_RECIPE="configs/stage1.py:vit=g"
  OPT67="configs/stage2.py:llm=opt6.7b"
  OPT67_B=64
  BUDGETS=(150 80 110 100 80 50)
else  # every part once, small and quick: one batch size each, few tokens, one timed repeat
  S1="4"
  S2="4"
  AOT_B=8
  TRAIN="benchmarks/train_step.py --size small --scan --remat none --text-len 8 --repeats 1 --chip h100"
  GEN="--size small --batch 2 --beams 1 2 --attn sdpa --new-tokens 4 --repeats 1"
  AOT="-m blip2_jax.aot --topology local --chip h100"
  S1_RECIPE="configs/stage1.py:tiny"
  OPT67="configs/stage2.py:llm=opt6.7b,tiny"
  OPT67_B=8
  BUDGETS=(240 240 240 240 240 240)
  TOTAL=${DRY_TOTAL:-900}
fi

"$PY" - "$WORK/meta.json" "$MODE" <<'EOF'
import datetime, json, subprocess, sys
try:
  dev = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                       text=True, timeout=20).stdout.strip().splitlines()[0]
except Exception:  # noqa: BLE001 - no GPU here
  dev = "no GPU (CPU dry run, small sizes; figures of an H100 for the estimates)"
json.dump(dict(mode="dry run" if sys.argv[2] == "dry" else "GPU", device=dev,
               date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M")), open(sys.argv[1], "w"))
EOF

# shellcheck disable=SC2086  # the size / batch lists split into words on purpose
run_part stage1 "${BUDGETS[0]}" "$PY" $TRAIN --stage 1 --batch $S1 --json "$WORK/train_1_stage1.json"
# shellcheck disable=SC2086
run_part aot_stage1 "${BUDGETS[1]}" "$PY" $AOT --config "$S1_RECIPE" --global-batch "$AOT_B" --run 3 \
  --config.model.dropout=False --json "$WORK/aot_1_stage1.json"
# shellcheck disable=SC2086
run_part stage2_opt "${BUDGETS[2]}" "$PY" $TRAIN --stage 2 --family opt --batch $S2 --json "$WORK/train_2_opt.json"
# shellcheck disable=SC2086
run_part generation "${BUDGETS[3]}" "$PY" benchmarks/generation.py $GEN --json "$WORK/generation.json"
# shellcheck disable=SC2086
run_part stage2_t5 "${BUDGETS[4]}" "$PY" $TRAIN --stage 2 --family t5 --batch $S2 --json "$WORK/train_3_t5.json"
# shellcheck disable=SC2086
run_part aot_opt67 "${BUDGETS[5]}" "$PY" $AOT --config "$OPT67" --global-batch "$OPT67_B" --run 1 \
  --config.model.dropout=False --json "$WORK/aot_2_opt67.json"

echo "== all parts: $(($(date +%s) - START))s"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/gpu_suite_parts"
  cp "$WORK"/*.log "$WORK"/*.json "$WORK/status.tsv" "$OUT/gpu_suite_parts/" 2>/dev/null
  "$PY" benchmarks/gpu_table.py "$WORK" --out "$OUT/gpu_suite.md"
else
  "$PY" benchmarks/gpu_table.py "$WORK"
fi
echo "(parts' logs and JSON: $WORK)"
