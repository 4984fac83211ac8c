"""The recipe under `torchrun --nproc_per_node 2` on CPU: it finishes and both processes hold the same adapter."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from glue_fixtures import RECIPE_DIR
from test_glue_finetune import base_args, needs_tucker


def free_port() -> int:
    """A port the OS reports free, so that parallel test sessions never share a rendezvous port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(model_dir: Path, data_dir: Path, out: Path, method: str, extra: list[str]) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(RECIPE_DIR / "finetune.py"), *base_args(model_dir, data_dir, out, "rte", method, 6), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def check_agreement(saved: dict) -> None:
    assert saved["world_size"] == 2 and saved["optimizer_steps"] == 6
    fingerprints = saved["processes"]["fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == pytest.approx(fingerprints[1], rel=1e-6, abs=1e-9)
    assert saved["processes"]["agree"] is True


def test_lora_two_processes(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    # evaluation batches of 5 split the 12 dev rows unevenly over the processes; predictions.json keeps row order
    extra = ["--rank", "4", "--train_sampling_strategy", "group_by_length", "--per_device_eval_batch_size", "5"]
    saved = run_torchrun(tiny_bert_dir, glue_dir, tmp_path / "lora", "lora", extra)
    check_agreement(saved)
    from tasks import load_glue

    rows = json.loads((tmp_path / "lora" / "predictions.json").read_text())["validation"]
    assert rows["labels"] == list(load_glue("rte", glue_dir)["validation"]["label"])
    assert len(rows["predictions"]) == 12


@needs_tucker
def test_tucker_two_processes(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    extra = ["--rank", "4", "--r_max", "8", "--core_steps", "2", "--augment_start_step", "2"]
    saved = run_torchrun(tiny_bert_dir, glue_dir, tmp_path / "tucker", "tucker", extra)
    check_agreement(saved)
    assert all(1 <= r <= 8 for ranks in saved["final_ranks"].values() for r in ranks)


def test_no_recipe_argument_abbreviates_a_torchrun_option():
    """torchrun's parser takes a prefix of its own options (`--r` for `--role`...) even after the script name."""
    import dataclasses
    import re

    from finetune import AdapterArguments, DataArguments, ModelArguments

    help_text = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    options = set(re.findall(r"--[a-z_-]+", help_text))
    assert "--role" in options
    ours = [f"--{f.name}" for dc in (ModelArguments, DataArguments, AdapterArguments) for f in dataclasses.fields(dc)]
    assert [name for name in ours if any(o.startswith(name) for o in options)] == []
