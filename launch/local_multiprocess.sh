#!/usr/bin/env bash
# Multi-host training on one machine: K local processes of D CPU devices each form one K*D-device
# mesh through jax.distributed (gloo collectives), exactly as K hosts would. For testing the
# multi-host code paths (per-process data shards, multi-process checkpoints, resume) without a pod.
#
#   bash launch/local_multiprocess.sh [-k K] [-d D] [--config CFG] [--workdir DIR] [--port P] \
#       [--python PY] [--quiet] [-- extra training flags, e.g. --max_steps 2 --config.log_every=1]
#
# Defaults: K=2, D=2, CFG=configs/stage2.py:tiny (relative to the repository root), DIR a new
# /tmp/blip2-mp.XXXXXX, P a free port.
# Environment equivalents: NUM_PROCESSES, DEVICES_PER_PROCESS, CONFIG, WORKDIR, PORT, PYTHON.
# Logs: DIR/logs/proc_<i>.log (process 0's is also shown live unless --quiet). If a process fails,
# the others are stopped and the script exits non-zero naming it, with the tail of its log.
# Ctrl-C / SIGTERM stop all processes (SIGTERM first: the loop saves a checkpoint; SIGKILL after
# GRACE_S=30 s). Rerunning with the same --workdir resumes.
set -euo pipefail

die() { echo "local_multiprocess.sh: error: $*" >&2; exit 2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

CALLER_PWD=$(pwd)
cd "$(dirname "$0")/.."  # the repository root: `configs.common` imports resolve from the working directory
K=${NUM_PROCESSES:-2}
D=${DEVICES_PER_PROCESS:-2}
CONFIG=${CONFIG:-configs/stage2.py:tiny}
WORKDIR=${WORKDIR:-}
PORT=${PORT:-}
QUIET=0
GRACE_S=${GRACE_S:-30}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
EXTRA=()

while [ $# -gt 0 ]; do
  case "$1" in
    -k|--num_processes|--num-processes) [ $# -ge 2 ] || die "$1 needs a value"; K=$2; shift 2 ;;
    -d|--devices|--devices-per-process) [ $# -ge 2 ] || die "$1 needs a value"; D=$2; shift 2 ;;
    --config) [ $# -ge 2 ] || die "$1 needs a value"; CONFIG=$2; shift 2 ;;
    --workdir) [ $# -ge 2 ] || die "$1 needs a value"; WORKDIR=$2; shift 2 ;;
    --port) [ $# -ge 2 ] || die "$1 needs a value"; PORT=$2; shift 2 ;;
    --python) [ $# -ge 2 ] || die "$1 needs a value"; PYTHON=$2; shift 2 ;;
    --quiet) QUIET=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (training flags go after '--'; see --help)" ;;
  esac
done

# ---- checks -------------------------------------------------------------------------------------
is_int() { [[ $1 =~ ^[0-9]+$ ]]; }
is_int "$K" && [ "$K" -ge 1 ] || die "the number of processes must be an integer >= 1 (got '$K')"
is_int "$D" && [ "$D" -ge 1 ] || die "the devices per process must be an integer >= 1 (got '$D')"
is_int "$GRACE_S" || die "GRACE_S must be a number of seconds (got '$GRACE_S')"
CONFIG_FILE=${CONFIG%%:*}
[ -f "$CONFIG_FILE" ] || die "config file '$CONFIG_FILE' not found (from --config '$CONFIG'; paths are relative to the repository root $(pwd))"
command -v "$PYTHON" >/dev/null 2>&1 || die "python '$PYTHON' not found (set --python or PYTHON)"
"$PYTHON" -c "import blip2_jax, jax" 2>/dev/null ||
  die "'$PYTHON' cannot import blip2_jax and jax: install it first (pip install -e .) or activate its environment"
if [ -z "$PORT" ]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
fi
is_int "$PORT" && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || die "--port must be in 1..65535 (got '$PORT')"
if [ -z "$WORKDIR" ]; then WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/blip2-mp.XXXXXX"); fi
[[ $WORKDIR == /* ]] || WORKDIR="$CALLER_PWD/$WORKDIR"  # relative to where the script was started
mkdir -p "$WORKDIR/logs" || die "cannot create '$WORKDIR/logs'"
WORKDIR=$(cd "$WORKDIR" && pwd)

# ---- launch -------------------------------------------------------------------------------------
echo "[local_multiprocess] $K processes x $D CPU devices, coordinator localhost:$PORT"
echo "[local_multiprocess] config $CONFIG, workdir $WORKDIR, logs $WORKDIR/logs/proc_<i>.log"
PIDS=()
TAIL_PID=
for ((i = 0; i < K; i++)); do
  # background jobs of a non-interactive shell ignore SIGINT: the trap below forwards Ctrl-C
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$D" JAX_PLATFORMS=cpu \
    "$PYTHON" -u -m blip2_jax.train --distributed --coordinator "localhost:$PORT" --num_processes "$K" \
      --process_id "$i" --config "$CONFIG" --workdir "$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"} \
      >"$WORKDIR/logs/proc_$i.log" 2>&1 &
  PIDS+=("$!")
done
if [ "$QUIET" = 0 ]; then
  tail -n +1 -f "$WORKDIR/logs/proc_0.log" &
  TAIL_PID=$!
fi

stop_all() {  # SIGTERM to the processes still running, SIGKILL to those left after GRACE_S
  local sig=$1 p waited=0
  for p in "${PIDS[@]}"; do kill "-$sig" "$p" 2>/dev/null || true; done
  while [ "$waited" -lt "$GRACE_S" ]; do
    local alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 1; waited=$((waited + 1))
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
finish() { [ -n "$TAIL_PID" ] && kill "$TAIL_PID" 2>/dev/null; wait 2>/dev/null || true; }
on_signal() {
  trap - INT TERM
  echo "[local_multiprocess] interrupted: stopping all $K processes (SIGTERM, SIGKILL after ${GRACE_S}s)" >&2
  stop_all TERM
  finish
  exit 130
}
trap on_signal INT TERM

# ---- wait: the first failure stops the rest (they would otherwise block in collectives) ---------
declare -A RC=()
FAILED=
while [ "${#RC[@]}" -lt "$K" ]; do
  for ((i = 0; i < K; i++)); do
    [ -n "${RC[$i]+x}" ] && continue
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      rc=0; wait "${PIDS[$i]}" || rc=$?
      RC[$i]=$rc
      if [ "$rc" != 0 ] && [ -z "$FAILED" ]; then
        FAILED=$i
        echo "[local_multiprocess] process $i (pid ${PIDS[$i]}) exited with status $rc: stopping the others" >&2
        stop_all TERM
      fi
    fi
  done
  [ "${#RC[@]}" -lt "$K" ] && sleep 1
done
trap - INT TERM
finish

if [ -n "$FAILED" ]; then
  echo "[local_multiprocess] FAILED: process $FAILED exited with status ${RC[$FAILED]}; last lines of $WORKDIR/logs/proc_$FAILED.log:" >&2
  tail -n 30 "$WORKDIR/logs/proc_$FAILED.log" | sed 's/^/  | /' >&2
  exit 1
fi
echo "[local_multiprocess] all $K processes finished OK; workdir $WORKDIR"
