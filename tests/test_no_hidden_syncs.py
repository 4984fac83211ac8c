"""No hidden host-device syncs in the step path: forward, backward, `before_step()` and `after_step()` read no tensor
value on the host (`.item()`, `.tolist()`, `.cpu()`, `bool(tensor)`, copies to the CPU) except at cycle events.

On the CPU every such read is recorded at two levels: the Python tensor methods (a `TorchFunctionMode`) and the
operators they dispatch (a `TorchDispatchMode`: `_local_scalar_dense` is what `.item()`/`bool()` run, `_to_copy` with
an explicit CPU device is a copy to the host). On CUDA, `torch.cuda.set_sync_debug_mode("error")` raises on any sync.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tests.test_rank_updater import batch, make
from tucker_lora.rank_updater import TuckerRankUpdater

HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}
SCHEDULE = {"augment_start_step": 2, "core_steps": 3}  # events after steps 2 (augment), 5 (truncate), 6, 9, ...


class _HostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS or (name == "to" and _names_cpu(args[1:], kwargs)):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


class _HostOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        name = str(func)
        if "_local_scalar_dense" in name or (name.startswith("aten._to_copy") and _names_cpu((), kwargs)):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _names_cpu(args, kwargs) -> bool:
    values = list(args) + list((kwargs or {}).values())
    return any((isinstance(v, torch.device) and v.type == "cpu") or v == "cpu" for v in values)


def _train_recording(train_bases: bool, optimizer: str, steps: int) -> dict[int, tuple[list[str], int]]:
    """Trains `steps` steps; per step the host reads seen in forward, backward, before_step and after_step (not in
    `optimizer.step()`, which is torch's), and the number of operators they dispatched."""
    model, opt = make(optimizer=optimizer, init_weights=False, train_bases=train_bases, **SCHEDULE)
    updater = TuckerRankUpdater(model, opt)
    seen = {}
    for step in range(steps):
        x, image, target = batch(step)
        functions, ops = _HostReads(), _HostOps()
        with functions, ops:
            ((model(x, image) - target) ** 2).mean().backward()
            updater.before_step()
        opt.step()
        with functions, ops:
            updater.after_step()
        opt.zero_grad()
        seen[step + 1] = (functions.reads + ops.reads, ops.calls)
    return seen


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("train_bases", [True, False])
def test_no_host_reads_outside_cycle_events(train_bases, optimizer):
    seen = _train_recording(train_bases, optimizer, steps=9)
    events = {2, 5, 6, 9}
    for step, (reads, calls) in seen.items():
        if step in events:
            # the detector sees the event's decisions made on the host: it can fail
            assert reads, f"no host read recorded at cycle event {step}"
        else:
            assert not reads, f"step {step} (no cycle event) read tensors on the host: {reads[:10]}"
            assert calls > 0
    quiet = {calls for step, (_, calls) in seen.items() if step not in events and step > 1}
    assert len(quiet) == 1, f"operator calls per non-event step vary: {sorted(quiet)}"


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA (torch.cuda.is_available() is False): set_sync_debug_mode reports device syncs only",
)
def test_no_device_sync_outside_cycle_events_on_cuda():
    model, opt = make(init_weights=False, train_bases=True, **SCHEDULE)
    model.cuda()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    updater = TuckerRankUpdater(model, opt)
    events = {2, 5, 6, 9}
    try:
        for step in range(9):
            x, image, target = (t.cuda() for t in batch(step))
            mode = "default" if step + 1 in events else "error"
            torch.cuda.set_sync_debug_mode(mode)
            ((model(x, image) - target) ** 2).mean().backward()
            updater.before_step()
            torch.cuda.set_sync_debug_mode("default")
            opt.step()
            torch.cuda.set_sync_debug_mode(mode)
            updater.after_step()
            torch.cuda.set_sync_debug_mode("default")
            opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert updater.step == 9
