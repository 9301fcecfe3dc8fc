#!/usr/bin/env bash
# Train on a Cloud TPU VM (one host) or pod slice (many hosts): create it, copy + install the repo on
# every worker, run the same training command on all of them, delete it.
#
#   bash launch/tpu_pod.sh COMMAND... [options] [-- extra training flags]
#
# COMMAND (one or more, run in this order): create | setup | train | delete | all (create setup train)
# Options (each also read from the environment variable in brackets):
#   --project P        GCP project                                        [PROJECT]
#   --zone Z           zone, e.g. us-central2-b (v4), us-east5-a (v5p)    [ZONE]
#   --tpu-name N       TPU VM name                                        [TPU_NAME]
#   --accelerator A    v4-8, v4-32, v5p-128, v5litepod-16, v6e-64, ...    [ACCELERATOR]
#   --version V        runtime; default per family: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
#                      v5litepod v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base  [RUNTIME_VERSION]
#   --spot             create a Spot TPU                                  [SPOT=1]
#   --repo-url URL     setup: git clone URL on the workers (--branch B) instead of copying
#                      this checkout's files                              [REPO_URL, BRANCH]
#   --bucket B         GCS bucket (name or gs://name) for the workdir     [BUCKET]
#   --run-name R       workdir = gs://B/blip2/R (default: the TPU name)   [RUN_NAME]
#   --workdir W        explicit workdir; must be gs://... on a multi-host slice  [WORKDIR]
#   --config C         recipe, e.g. configs/stage1.py:vit=g               [CONFIG]
#   --detach           train: run under nohup on the workers (log ~/blip2-train.log) and return
#   --dry-run          print the gcloud commands instead of running them (no gcloud needed)
# Extra training flags after `--` are passed on: -- --config.data.annotations=gs://... --max_steps 100
#
# Example:
#   PROJECT=my-proj ZONE=us-central2-b TPU_NAME=blip2 ACCELERATOR=v4-32 BUCKET=my-bucket \
#     bash launch/tpu_pod.sh all --config configs/stage1.py:vit=g -- --config.data.annotations=...
#   bash launch/tpu_pod.sh delete --project my-proj --zone us-central2-b --tpu-name blip2
set -euo pipefail

PROG=tpu_pod.sh
die() { echo "$PROG: error: $*" >&2; exit 2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
TPU_NAME=${TPU_NAME:-}
ACCELERATOR=${ACCELERATOR:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-0}
REPO_URL=${REPO_URL:-}
BRANCH=${BRANCH:-}
BUCKET=${BUCKET:-}
RUN_NAME=${RUN_NAME:-}
WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-}
GCLOUD=${GCLOUD:-gcloud}
REMOTE_DIR=${REMOTE_DIR:-blip2-jax}  # on each worker, relative to the home directory
DETACH=0
DRY_RUN=0
COMMANDS=()
EXTRA=()

need() { [ "$2" -ge 2 ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    create|setup|train|delete) COMMANDS+=("$1"); shift ;;
    all) COMMANDS+=(create setup train); shift ;;
    --project) need "$1" $#; PROJECT=$2; shift 2 ;;
    --zone) need "$1" $#; ZONE=$2; shift 2 ;;
    --tpu-name|--name) need "$1" $#; TPU_NAME=$2; shift 2 ;;
    --accelerator|--accelerator-type) need "$1" $#; ACCELERATOR=$2; shift 2 ;;
    --version|--runtime-version) need "$1" $#; RUNTIME_VERSION=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --repo-url) need "$1" $#; REPO_URL=$2; shift 2 ;;
    --branch) need "$1" $#; BRANCH=$2; shift 2 ;;
    --bucket) need "$1" $#; BUCKET=$2; shift 2 ;;
    --run-name) need "$1" $#; RUN_NAME=$2; shift 2 ;;
    --workdir) need "$1" $#; WORKDIR=$2; shift 2 ;;
    --config) need "$1" $#; CONFIG=$2; shift 2 ;;
    --detach) DETACH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (commands: create setup train delete all; training flags go after '--'; see --help)" ;;
  esac
done
[ "${#COMMANDS[@]}" -gt 0 ] || die "no command given: one or more of create | setup | train | delete | all (see --help)"
has() { local c; for c in "${COMMANDS[@]}"; do [ "$c" = "$1" ] && return 0; done; return 1; }

# ---- checks: everything before the first gcloud call --------------------------------------------
if [ "$DRY_RUN" = 0 ]; then
  command -v "$GCLOUD" >/dev/null 2>&1 ||
    die "'$GCLOUD' not found: install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login', or use --dry-run"
fi
[ -n "$PROJECT" ] || die "no GCP project: set PROJECT or --project"
[ -n "$ZONE" ] || die "no zone: set ZONE or --zone (e.g. us-central2-b)"
[ -n "$TPU_NAME" ] || die "no TPU name: set TPU_NAME or --tpu-name"
[[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "TPU name '$TPU_NAME' is not valid: lowercase letters, digits and '-', starting with a letter"

HOSTS=0  # 0: unknown (train without --accelerator): a gs:// workdir is required then
if has create && [ -z "$ACCELERATOR" ]; then
  die "no accelerator type: set ACCELERATOR or --accelerator (e.g. v4-8, v5p-128, v5litepod-16, v6e-64)"
fi
if [ -n "$ACCELERATOR" ]; then
  [[ $ACCELERATOR =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-([0-9]+)$ ]] ||
    die "accelerator type '$ACCELERATOR' not understood: expected FAMILY-SIZE with FAMILY one of v2 v3 v4 v5p v5litepod v6e (e.g. v4-8, v5p-128, v5litepod-16, v6e-64)"
  FAMILY=${BASH_REMATCH[1]}
  SIZE=${BASH_REMATCH[2]}
  [ "$SIZE" -ge 1 ] || die "accelerator type '$ACCELERATOR': the size must be >= 1"
  # SIZE counts TensorCores (v2-v5p: 8 a host) or chips (v5e, v6e: up to 8 on one host; 4 a host
  # in multi-host slices)
  if [ "$SIZE" -le 8 ]; then HOSTS=1
  elif [ "$FAMILY" = v5litepod ] || [ "$FAMILY" = v6e ]; then HOSTS=$(( (SIZE + 3) / 4 ))
  else HOSTS=$(( (SIZE + 7) / 8 )); fi
  if [ -z "$RUNTIME_VERSION" ]; then
    case "$FAMILY" in
      v6e) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
      v5p) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
      v5litepod) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
      *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    esac
  fi
fi

if has train; then
  [ -n "$CONFIG" ] || die "no training config: set CONFIG or --config (e.g. configs/stage1.py:vit=g)"
  [ -f "$REPO_ROOT/${CONFIG%%:*}" ] || die "config file '${CONFIG%%:*}' not found in $REPO_ROOT (from --config '$CONFIG'; give it relative to the repository root)"
  if [ -z "$WORKDIR" ]; then
    [ -n "$BUCKET" ] || die "no workdir: set BUCKET (or --bucket; the workdir becomes gs://BUCKET/blip2/RUN_NAME) or WORKDIR"
    BUCKET=${BUCKET#gs://}; BUCKET=${BUCKET%/}
    [[ $BUCKET =~ ^[a-z0-9][-_.a-z0-9]*[a-z0-9]$ ]] || die "bucket name '$BUCKET' is not valid"
    WORKDIR="gs://$BUCKET/blip2/${RUN_NAME:-$TPU_NAME}"
  fi
  if [[ $WORKDIR != gs://?* ]]; then
    if [ "$HOSTS" = 0 ]; then
      die "workdir '$WORKDIR' is not on gs://: without --accelerator the slice may have several hosts, which must all use the same workdir; use gs://BUCKET/... (--bucket or --workdir), or give --accelerator for a one-host TPU"
    elif [ "$HOSTS" -gt 1 ]; then
      die "workdir '$WORKDIR' is not on gs://: $ACCELERATOR has $HOSTS hosts and every one must read and write the same workdir (checkpoints); use gs://BUCKET/... (--bucket or --workdir)"
    fi
    echo "$PROG: warning: workdir '$WORKDIR' is on the TPU VM's local disk: it is lost with 'delete'" >&2
  fi
fi
if has setup && [ -z "$REPO_URL" ]; then
  [ -f "$REPO_ROOT/setup.py" ] || die "no setup.py in $REPO_ROOT: run this script from a blip2-jax checkout or give --repo-url"
fi

# ---- running ------------------------------------------------------------------------------------
shq() {  # one word, shell-quoted (single quotes only where needed)
  if [[ $1 =~ ^[-_./:=,@%+A-Za-z0-9]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote() { local out="" a; for a in "$@"; do out+="$(shq "$a") "; done; printf '%s' "${out% }"; }
run() {  # prints the command (copy-pasteable), then runs it unless --dry-run
  printf '+ %s\n' "$(quote "$@")"
  [ "$DRY_RUN" = 1 ] || "$@"
}
GC=("$GCLOUD" compute tpus tpu-vm)
LOC=(--project "$PROJECT" --zone "$ZONE")
on_all_workers() { run "${GC[@]}" ssh "$TPU_NAME" "${LOC[@]}" --worker=all --command "$1"; }

do_create() {
  local args=("${GC[@]}" create "$TPU_NAME" "${LOC[@]}" --accelerator-type "$ACCELERATOR" --version "$RUNTIME_VERSION")
  [ "$SPOT" = 1 ] && args+=(--spot)
  echo "== create $TPU_NAME: $ACCELERATOR ($HOSTS host(s)), runtime $RUNTIME_VERSION"
  run "${args[@]}"
}

do_setup() {
  echo "== setup: blip2-jax into ~/$REMOTE_DIR on every worker, then pip install"
  if [ -n "$REPO_URL" ]; then
    local clone=(git clone --depth 1)
    [ -n "$BRANCH" ] && clone+=(--branch "$BRANCH")
    clone+=("$REPO_URL" "$REMOTE_DIR")
    on_all_workers "rm -rf $(quote "$REMOTE_DIR") && $(quote "${clone[@]}")"
  else
    # this checkout's files as they are (uncommitted changes included), without caches / venvs
    local tarball=${TMPDIR:-/tmp}/blip2-jax-$TPU_NAME.tar.gz
    run tar -czf "$tarball" -C "$REPO_ROOT" --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.pytest_cache --exclude='workdir*' .
    run "${GC[@]}" scp "$tarball" "$TPU_NAME:blip2-jax.tar.gz" "${LOC[@]}" --worker=all
    on_all_workers "rm -rf $(quote "$REMOTE_DIR") && mkdir -p $(quote "$REMOTE_DIR") && tar -xzf blip2-jax.tar.gz -C $(quote "$REMOTE_DIR") && rm blip2-jax.tar.gz"
  fi
  on_all_workers "cd $(quote "$REMOTE_DIR") && python3 -m pip install -q -U pip && python3 -m pip install -q -e . 'jax[tpu]' && python3 -c 'import jax; print(jax.process_index(), jax.device_count(), jax.local_device_count())'"
}

do_train() {
  local cmd=(python3 -m blip2_jax.train --distributed --config "$CONFIG" --workdir "$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})
  echo "== train on all ${ACCELERATOR:+$HOSTS }worker(s): workdir $WORKDIR"
  if [ "$DETACH" = 1 ]; then
    on_all_workers "cd $(quote "$REMOTE_DIR") && nohup $(quote "${cmd[@]}") > ~/blip2-train.log 2>&1 < /dev/null &"
    echo "== detached; follow worker 0 with: $(quote "${GC[@]}" ssh "$TPU_NAME" "${LOC[@]}" --worker=0 --command 'tail -f ~/blip2-train.log')"
  else
    on_all_workers "cd $(quote "$REMOTE_DIR") && $(quote "${cmd[@]}")"
  fi
}

do_delete() {
  echo "== delete $TPU_NAME"
  run "${GC[@]}" delete "$TPU_NAME" "${LOC[@]}" --quiet
}

[ "$DRY_RUN" = 1 ] && echo "== dry run: printing the commands, running none"
for c in "${COMMANDS[@]}"; do "do_$c"; done
