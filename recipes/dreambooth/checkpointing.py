"""Checkpoints that a crash cannot corrupt: written to a hidden temporary folder, then renamed into place.

A checkpoint holds the adapter tensors at full storage (Tucker: core and bases at capacity plus the rank buffers),
the optimizer and learning-rate scheduler states and the step counters: with the step-indexed data order and noise
of the training loop, that is all a resumed run needs to continue bit-identically.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_FILE = "adapter_state.safetensors"
STATE_FILE = "trainer_state.json"


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (parameters and rank buffers) of `model`, by name."""
    return {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in model.state_dict().items()
        if ".tucker_" in name or ".lora_" in name
    }


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in `output_dir`, oldest first (temporary folders of an interrupted save are ignored)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str) -> str | None:
    """The folder to resume from: `latest` is the newest complete checkpoint in `output_dir` (None: there is none)."""
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume_from_checkpoint, STATE_FILE)):
        raise ValueError(
            f"`resume_from_checkpoint` must be 'latest' or a checkpoint folder holding {STATE_FILE}; "
            f"got {resume_from_checkpoint!r}."
        )
    return resume_from_checkpoint


def save_checkpoint(
    output_dir: str, step: int, model: nn.Module, optimizer, lr_scheduler, state: dict, total_limit: int | None
) -> str:
    """Write `checkpoint-{step}` atomically, then delete the oldest ones beyond `total_limit`."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(adapter_state(model), os.path.join(tmp, ADAPTER_FILE))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(lr_scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    with open(os.path.join(tmp, STATE_FILE), "w") as f:  # written last: its presence marks a complete checkpoint
        json.dump(state, f, indent=2)
    if os.path.isdir(final):  # the same step saved again (a resumed run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit is not None:
        for _, old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    return final


def load_checkpoint(folder: str, model: nn.Module, optimizer, lr_scheduler) -> dict:
    """Restore what `save_checkpoint` wrote into `model`, `optimizer`, `lr_scheduler`; returns the saved state."""
    tensors = load_file(os.path.join(folder, ADAPTER_FILE))
    expected = set(adapter_state(model))
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise ValueError(
            f"`resume_from_checkpoint` {folder!r} does not match this model's adapters (other --method, --rank, "
            f"--r_max or --target_modules?): missing {missing}, unexpected {unexpected}."
        )
    model.load_state_dict(tensors, strict=False)
    optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=False))
    lr_scheduler.load_state_dict(torch.load(os.path.join(folder, "scheduler.pt"), weights_only=False))
    with open(os.path.join(folder, STATE_FILE)) as f:
        return json.load(f)
