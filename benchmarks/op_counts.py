"""Operator calls of a training step, counted with `torch.profiler`: the launch-count proxy of `overhead.py`.

* `operator_calls`: `aten::` operators called from outside another `aten::` operator, i.e. by Python code or by an
  autograd node in backward (on an accelerator each is at least one kernel launch or a host-side dispatch);
* `leaf_operators`: `aten::` operators that call no other one (views and allocations included);
* `host_reads`: `aten::_local_scalar_dense`, what `.item()`, `bool(tensor)` and `int(tensor)` run (a device sync on an
  accelerator); `to_copies`: `aten::_to_copy` (dtype or device conversions: host-device transfers among them);
* `cuda_kernels`: kernels the profiler saw on the GPU (None on the CPU).

The cycle of `TuckerRankUpdater` against the number of same-shape layers (`cycle_vs_layers`) is measured on a stack
of `Linear(width, width)` layers, all adapted, so that only the layer count changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def _activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def summarize(events) -> dict:
    """The counts of the module docstring, from a profiler's `events()`."""
    calls = leaves = reads = copies = kernels = 0
    for event in events:
        if event.device_type == DeviceType.CUDA:
            kernels += 1
            continue
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        calls += parent is None or not parent.name.startswith("aten::")
        leaves += not any(child.name.startswith("aten::") for child in event.cpu_children)
        reads += event.name == "aten::_local_scalar_dense"
        copies += event.name == "aten::_to_copy"
    return {
        "operator_calls": calls,
        "leaf_operators": leaves,
        "host_reads": reads,
        "to_copies": copies,
        "cuda_kernels": kernels or None,
    }


def count(fn: Callable[[], object], device: torch.device) -> dict:
    """Counts of one call of `fn` (the device synchronized around it, so its kernels are all recorded)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    with profile(activities=_activities(device)) as prof:
        fn()
        sync()
    return summarize(prof.events())


def _stack(n_layers: int, width: int) -> nn.Module:
    return nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(n_layers)))


def cycle_vs_layers(layer_counts: list[int], width: int, core_steps: int, device: torch.device, tokens: int = 16):
    """Per layer count: operator calls and time of `before_step()` + `after_step()` summed over one whole cycle
    (augmentation after step 1, `core_steps` core steps, truncation after step `core_steps + 1`), Tucker r=8 on every
    layer of a stack of `Linear(width, width)`, AdamW; forward and backward are not counted."""
    from peft import get_peft_model

    from tucker_lora import TuckerAdapterConfig
    from tucker_lora.rank_updater import TuckerRankUpdater

    out = {}
    for n_layers in layer_counts:
        torch.manual_seed(0)
        targets = [f"{i}.0" for i in range(n_layers)]
        config = TuckerAdapterConfig(
            r=8, alpha=8, target_modules=targets, init_weights=False, core_steps=core_steps, augment_start_step=0
        )
        model = get_peft_model(_stack(n_layers, width), config).to(device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
        updater = TuckerRankUpdater(model, optimizer)
        x = torch.randn(tokens, width, device=device)
        totals = {"operator_calls": 0, "leaf_operators": 0, "host_reads": 0, "to_copies": 0, "cuda_kernels": 0}
        seconds = 0.0
        for _ in range(core_steps + 1):
            model(x).square().mean().backward()
            start = time.perf_counter()
            before = count(updater.before_step, device)
            optimizer.step()
            after = count(updater.after_step, device)
            seconds += time.perf_counter() - start
            for key in totals:
                totals[key] += (before[key] or 0) + (after[key] or 0)
            optimizer.zero_grad(set_to_none=True)
        steps = core_steps + 1
        out[n_layers] = {
            "cycle_totals": totals,
            "per_step": {key: value / steps for key, value in totals.items()},
            "cycle_seconds_under_profiler": seconds,
            "adapted_layers": n_layers,
        }
    return out
