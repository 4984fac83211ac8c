"""Two real processes (torchrun, gloo, CPU): Trainer + TuckerRankCallback keep every process bit-identical
(METHOD section 9, item 10), with gradient accumulation 2 and ranks that change, and without a hang; with a
`param_budget` too, which every process must keep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "ddp" / "train_ddp.py"
MASTER_PORT = 29581  # distinct from any other test's; each case adds its index (xdist may run them at once)


OPTIONS = [None, 110, "absorb_core"]


@pytest.mark.parametrize("option", OPTIONS, ids=["tau", "param_budget", "absorb_core"])
def test_two_processes_stay_bit_identical(tmp_path, option):
    """`option`: none (tau), a `param_budget` of 110, or `absorb_core` (the linear adapter folded between events)."""
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
        "PYTHONPATH": str(Path(__file__).parent.parent),
    }  # fmt: skip
    port = str(MASTER_PORT + OPTIONS.index(option))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
        str(SCRIPT), str(tmp_path), *([] if option is None else [str(option)]),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [torch.load(tmp_path / f"state{rank}.pt") for rank in (0, 1)]
    assert all(r["world_size"] == 2 and r["global_step"] == 32 for r in results)
    # process 1 perturbed every truncation; the broadcast from process 0 must have undone it at every step
    assert results[0]["mismatched_steps"] == [] and results[1]["mismatched_steps"] == []
    first, second = results[0]["state"], results[1]["state"]
    assert set(first) == set(second) and any(key.endswith("exp_avg_sq") for key in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    distinct_ranks = {tuple(step) for step in results[0]["ranks"]}
    assert len(distinct_ranks) >= 3  # ranks changed during the run (augmentations and truncations)
    if isinstance(option, int):
        # the first truncation ends step 4 (augment_start_step 2, core_steps 2): from then on within the budget
        settled = results[0]["settled_params"]
        assert settled[:3] == [136] * 3 and all(count <= option for count in settled[3:]), settled
        assert results[1]["settled_params"] == settled
