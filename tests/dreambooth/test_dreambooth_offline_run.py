"""End to end: `run_offline.sh` builds a (very short) base and trains on the dog (slow; needs ../shared/data)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from dreambooth_fixtures import REPO, SHARED_DATA


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_run_offline_sh_end_to_end(tmp_path):
    env = dict(
        os.environ, BASE_DIR=str(tmp_path / "base"), BASE_STEPS="3", OUT=str(tmp_path / "dog"), OMP_NUM_THREADS="1"
    )
    extra = ["--max_train_steps", "4", "--num_class_images", "2", "--num_validation_images", "2",
             "--num_inference_steps", "2", "--logging_steps", "2"]  # fmt: skip
    run = subprocess.run(
        ["bash", "recipes/dreambooth/run_offline.sh", *extra], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "active trainable parameters" in run.stdout and "against LoRA r=4" in run.stdout
    metrics = json.loads((tmp_path / "dog" / "metrics.json").read_text())
    assert metrics["pretrained_model_name_or_path"] == str(tmp_path / "base")
    assert metrics["heldout_loss"] is not None and len(metrics["history"]) == 2
    for name in ("pytorch_lora_weights.safetensors", "ranks.png", "validation/step-000004.png"):
        assert (tmp_path / "dog" / name).is_file(), name
