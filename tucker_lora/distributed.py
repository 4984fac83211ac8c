"""Several processes: decide a rank cycle once and broadcast it; reject parameter sharding (METHOD section 5).

Under DDP every process sees the same all-reduced gradients, but QR, SVD and eigendecompositions are not guaranteed
bit-identical across processes, and a near tie between singular values can give different ranks. Every process
therefore computes the cycle, then the adapter tensors, the ranks and the core's optimizer moments of process 0 are
broadcast to all. Shapes never change, so every process makes the same broadcast calls in the same order: no hang.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """Whether `torch.distributed` is initialized with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrites, in place, every tensor with its value on process `src` (no-op without several processes).

    Tensors are packed into one flat buffer per (device, dtype), so a cycle costs a few collective calls whatever the
    number of layers. Every process must pass tensors of the same shapes, dtypes and order.

    Args:
        tensors (`Iterable[torch.Tensor]`): the tensors to synchronize (parameters' `.data`, buffers, state).
        src (`int`): the process whose values win.
    """
    if not is_distributed():
        return
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def check_no_parameter_sharding(model: nn.Module | None = None, args: Any = None) -> None:
    """Raises if FSDP or DeepSpeed is in use: the rank cycle needs every process to hold whole adapter tensors.

    Looks at `transformers.TrainingArguments` (`fsdp`, `deepspeed`), at accelerate's state when one exists, and at the
    model's parameters (DeepSpeed ZeRO-3 marks them with `ds_id`; FSDP wraps them in flat parameters or DTensors).

    Raises:
        `ValueError`: naming what was found.
    """
    found = []
    if args is not None:
        if getattr(args, "fsdp", None):
            found.append(f"FSDP (TrainingArguments.fsdp={args.fsdp!r})")
        if getattr(args, "deepspeed", None):
            found.append(f"DeepSpeed (TrainingArguments.deepspeed={args.deepspeed!r})")
    found += _accelerate_sharding()
    if model is not None:
        for name, param in model.named_parameters():
            if hasattr(param, "ds_id"):
                found.append(f"DeepSpeed ZeRO-3 (parameter {name!r} is partitioned)")
                break
            if type(param).__name__ in ("FlatParameter", "DTensor") or getattr(param, "_is_flat_param", False):
                found.append(f"FSDP (parameter {name!r} is a {type(param).__name__})")
                break
    if found:
        raise ValueError(
            "Tucker rank updates need every process to hold whole adapter tensors and their optimizer state, so "
            f"FSDP and DeepSpeed are not supported; found {', '.join(dict.fromkeys(found))}. Train with DDP (torchrun "
            "or `accelerate launch` with multi_gpu) instead."
        )


def _accelerate_sharding() -> list[str]:
    try:
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType
    except ImportError:  # accelerate is optional for hand-written loops
        return []
    if not AcceleratorState._shared_state:
        return []
    distributed_type = getattr(AcceleratorState(), "distributed_type", None)
    if distributed_type == DistributedType.FSDP:
        return ["FSDP (accelerate's distributed_type)"]
    if distributed_type == DistributedType.DEEPSPEED:
        return ["DeepSpeed (accelerate's distributed_type)"]
    return []
