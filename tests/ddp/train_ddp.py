"""Trainer under torchrun (2 CPU processes, gloo) with TuckerRankCallback; launched by tests/test_ddp.py.

    torchrun --nproc_per_node 2 --master_port 29581 tests/ddp/train_ddp.py OUTPUT_DIR [PARAM_BUDGET | absorb_core]

Process 1 perturbs every truncation it computes (as a differing SVD would), so only the broadcast from process 0
can make the processes agree. After every optimizer step a checking callback compares a digest of each process's
adapter tensors, ranks and core optimizer state; at the end each process saves that state to OUTPUT_DIR/state{rank}.pt.
With PARAM_BUDGET the adapter has that `param_budget` and `tau=0.01`, so that the budget decides the ranks; with
`absorb_core` its linear adapter is kept folded between cycle events.
"""

from __future__ import annotations

import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

import tucker_lora.batched_cycle as batched_cycle  # noqa: E402
from tests.ddp.task import adapter_state, dataset, training_args, tucker_model  # noqa: E402
from tucker_lora.callback import TuckerRankCallback  # noqa: E402

MAX_STEPS = 32


def digest(state: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for key in sorted(state):
        sha.update(key.encode())
        sha.update(state[key].detach().contiguous().cpu().numpy().tobytes())
    return sha.hexdigest()


class CheckIdentical(TrainerCallback):
    """After every optimizer step (after TuckerRankCallback's cycle): are all processes bit-identical?"""

    def __init__(self, rank_callback: TuckerRankCallback) -> None:
        self.rank_callback = rank_callback
        self.mismatched_steps: list[int] = []
        self.ranks: list[list[int]] = []
        self.settled_params: list[int] = []  # active parameters at the ranks of the latest truncation

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest(adapter_state(model, optimizer)))
        if len(set(digests)) > 1:
            self.mismatched_steps.append(state.global_step + 1)
        self.ranks.append([int(v) for k, v in adapter_state(model).items() if k.endswith(".ranks") for v in v])
        self.settled_params.append(self.rank_callback.updater.metrics()["tucker_active_params"])


def perturbed(apply_truncation):
    """The batched truncation, then noise on every truncated core: what a process with other rounding would hold."""

    def wrapper(batch, spectra, ranks):
        rotations = apply_truncation(batch, spectra, ranks)
        with torch.no_grad():
            for core, layer_ranks in zip(batch.cores, ranks):
                block = tuple(slice(0, r) for r in layer_ranks)
                core[block] += 1e-4 * torch.randn(core[block].shape)
        return rotations

    return wrapper


def main() -> None:
    output_dir = sys.argv[1]
    rank = int(os.environ["RANK"])
    if rank == 1:
        batched_cycle.apply_truncation = perturbed(batched_cycle.apply_truncation)
    option = sys.argv[2] if len(sys.argv) > 2 else None
    if option == "absorb_core":
        budget = {"tau": 0.1, "absorb_core": True}
    else:
        budget = {"param_budget": int(option), "tau": 0.01} if option is not None else {"tau": 0.1}
    model = tucker_model(core_steps=2, augment_start_step=2, r=2, r_max=4, **budget)
    rank_callback = TuckerRankCallback()
    checker = CheckIdentical(rank_callback)
    args = training_args(
        output_dir, max_steps=MAX_STEPS, gradient_accumulation_steps=2, per_device_train_batch_size=4, seed=0
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[rank_callback, checker])
    trainer.train()
    result = {
        "state": adapter_state(model, trainer.optimizer),
        "mismatched_steps": checker.mismatched_steps,
        "ranks": checker.ranks,
        "settled_params": checker.settled_params,
        "world_size": dist.get_world_size(),
        "global_step": trainer.state.global_step,
    }
    torch.save(result, os.path.join(output_dir, f"state{rank}.pt"))


if __name__ == "__main__":
    main()
