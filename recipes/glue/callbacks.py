"""Trainer callbacks of the GLUE recipe: AdaLoRA's rank allocator and a progress bar with short log lines.

PEFT's AdaLoRA only reallocates ranks when `update_and_allocate` is called, and nothing in PEFT or transformers calls
it: under `Trainer` without this callback AdaLoRA trains as plain LoRA at `init_r`.
"""

from __future__ import annotations

import torch
from peft.tuners.adalora.layer import AdaLoraLayer
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ProgressCallback


def adalora_ranks(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """Rank allocated to every AdaLoRA layer of a `PeftModel`, keyed by module name.

    The allocation is AdaLoRA's `rank_pattern` (one keep/drop flag per singular value) once the allocator has run,
    and `init_r` for every layer before that.
    """
    pattern = model.peft_config[adapter_name].rank_pattern or {}
    ranks = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, AdaLoraLayer) and adapter_name in module.r:
            mask = pattern.get(f"{name}.lora_E.{adapter_name}", pattern.get(f"{name}.lora_E"))
            ranks[name] = int(sum(mask)) if mask is not None else int(module.r[adapter_name])
    return ranks


class AdaLoraAllocatorCallback(TrainerCallback):
    """Calls `update_and_allocate(global_step)` on an AdaLoRA model after every optimizer step.

    `on_optimizer_step` runs after `optimizer.step()` and before `zero_grad()`, with gradients accumulated and (under
    DDP) all-reduced: what AdaLoRA's importance scores need. `state.global_step` is the index of the step just taken
    (0-based), as in PEFT's own example loop. Every `log_every` steps the total rank is recorded in `history` and in
    the Trainer logs.

    Args:
        log_every (`int`): how often (in optimizer steps) the total rank is recorded.
    """

    def __init__(self, log_every: int = 10) -> None:
        if log_every < 1:
            raise ValueError(f"`log_every` must be a positive integer; got {log_every}")
        self.log_every = log_every
        self.history: list[tuple[int, int]] = []

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if model is None or not hasattr(model.base_model, "update_and_allocate"):
            raise ValueError(
                "AdaLoraAllocatorCallback needs an AdaLoRA PeftModel; got a model without update_and_allocate"
            )
        model.base_model.update_and_allocate(state.global_step)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if state.global_step % self.log_every == 0 or state.global_step == state.max_steps:
            total = sum(adalora_ranks(model).values())
            self.history.append((state.global_step, total))
            state.log_history.append({"step": state.global_step, "adalora_total_rank": total})


class CompactProgressCallback(ProgressCallback):
    """Trainer's progress bar, printing each log without the per-module entries (keys with a `/`, such as
    `tucker_rank/<module>/<mode>`); they stay in `trainer.state.log_history`, `trainer_state.json` and the rank plot.

    Add it after the callbacks that write into the logs, in place of `ProgressCallback`.
    """

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ) -> None:
        if logs is not None:
            logs = {key: value for key, value in logs.items() if "/" not in key}
        super().on_log(args, state, control, logs=logs, **kwargs)
