#!/usr/bin/env bash
# The first run: set up a virtual environment, then build tiny random BLIP-2 checkpoints of every
# family locally (no download), convert them, and print the stage-by-stage parity tables against
# PyTorch. Usage: bash launch/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "[demo] creating .venv and installing blip2-jax with its test extras (torch CPU, transformers)"
  python3 -m venv .venv
fi
. .venv/bin/activate
pip install -q -e ".[test]"
python -m blip2_jax.parity --tiny-random all
