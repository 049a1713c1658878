#!/usr/bin/env bash
# Create .venv in the repo root and install moekit into it.
#   bash scripts/setup.sh         library + CLI
#   bash scripts/setup.sh test    plus the test extra (pytest, hypothesis, transformers)
# torch==2.13.0 (a CPU build) is installed first when torch is missing, so that resolving the
# `torch` requirement never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
py=.venv/bin/python
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install --quiet "torch==2.13.0"
fi
if [ -n "$extra" ]; then
    "$py" -m pip install --quiet -e ".[$extra]"
else
    "$py" -m pip install --quiet -e .
fi
