"""Checks around the rank cycle of `TuckerRankUpdater`: adapter weights replaced behind its back, non-finite
gradients and cores at cycle events, and misuse of the `before_step()` / `optimizer.step()` / `after_step()` order.

Kept apart from `rank_updater.py` so that the cycle itself stays short: every check is one call from there.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any

import torch

logger = logging.getLogger(__name__)


def core_fingerprints(group: Any) -> dict[str, tuple[int, int]]:
    """Identity and in-place version counter of every core of `group`: both change when anything but the updater's
    own cycle writes the cores after the latest `after_step()` (`load_adapter`, `load_state_dict`)."""
    return {module: (id(layer.tucker_core[group.name]), layer.tucker_core[group.name]._version)
            for module, layer in group.layers}  # fmt: skip


def record_cores(updater: Any) -> None:
    """Remember the cores as the updater left them (at creation and at the end of `after_step()`), with the
    optimizer's step counts, for the call-order checks."""
    updater._core_fingerprints = {group.name: core_fingerprints(group) for group in updater.groups}
    updater._optimizer_steps = _optimizer_steps(updater)
    updater._before_step_done = False


def cores_replaced(updater: Any, group: Any) -> bool:
    """Whether the cores of `group` were written since the updater last touched them. Then the updater's record of
    the cycle (augmented or not) describes other weights: `finalize()` must leave the loaded adapter as it is, so that
    e.g. Trainer's `load_best_model_at_end` keeps the best checkpoint's ranks and outputs."""
    recorded = getattr(updater, "_core_fingerprints", {}).get(group.name)
    if recorded is None or recorded == core_fingerprints(group):
        return False
    logger.info(
        "Adapter %r was loaded or written since the last optimizer step: finalize() keeps its ranks as loaded.",
        group.name,
    )
    return True


def _finite_flags(tensors: list[torch.Tensor | None]) -> list[bool]:
    """Whether each tensor holds only finite values (None counts as finite), with one host read for all: the
    Euclidean norm of each (NaN and inf propagate) from one multi-tensor call. On the CPU it is ~15x faster than the
    largest magnitude, but it also overflows for huge finite values: only the tensors it flags are decided again by
    their largest magnitude (a second read, never taken in a healthy run)."""
    present = [t.data for t in tensors if t is not None]
    with torch.no_grad():
        flags = torch.isfinite(torch.stack(torch._foreach_norm(present))).tolist() if present else []
        if not all(flags):
            suspects = [t for t, ok in zip(present, flags) if not ok]
            exact = iter(torch.isfinite(torch.stack(torch._foreach_norm(suspects, float("inf")))).tolist())
            flags = [ok or next(exact) for ok in flags]
    flags = iter(flags)
    return [True if t is None else next(flags) for t in tensors]


def _modules_with_nonfinite(group: Any, per_layer: list) -> list[str]:
    """The modules of `group` whose tensors (`per_layer[i]` for layer i) hold NaN or inf, from one host read."""
    flags = _finite_flags([t for tensors in per_layer for t in tensors])
    bad, start = [], 0
    for (module, _), tensors in zip(group.layers, per_layer):
        if not all(flags[start : start + len(tensors)]):
            bad.append(module)
        start += len(tensors)
    return bad


def skip_nonfinite_event(updater: Any, group: Any, action: str, step: int) -> bool:
    """Checks the inputs of the cycle event `action` ending optimizer step `step` before it runs.

    A non-finite basis gradient at an augmentation (an fp16 loss scaler's overflow step, a NaN loss) would write NaN
    into the new basis columns: the augmentation is skipped with a warning naming the step and the layers, and the
    cycle goes on (the truncation that follows works on the unaugmented adapter). A non-finite core means the
    optimizer already stepped a non-finite gradient: continuing would spread it into the bases, so this raises (also
    for a non-finite basis, which only a caller's own writes can make: with `train_bases`, `before_step()` zeroes
    non-finite basis gradients before the optimizer sees them).

    Returns:
        `bool`: whether to skip the event.

    Raises:
        `FloatingPointError`: if a core of `group` holds NaN or inf.
    """
    # with `train_bases` the optimizer steps the bases too: a non-finite step reaches them as it reaches the core
    per_layer = [(layer.tucker_core[group.name], *layer.tucker_bases[group.name]) for _, layer in group.layers]
    bad_cores = _modules_with_nonfinite(group, per_layer)
    if bad_cores:
        raise FloatingPointError(
            f"Tucker cores of adapter {group.name!r} hold NaN or inf after optimizer step {step}, in {bad_cores}: the "
            "optimizer stepped a non-finite gradient. Lower the learning rate, clip gradients, or skip non-finite "
            "steps (an fp16 loss scaler does), and resume from a checkpoint."
        )
    if action != "augment":
        return False
    grads = [updater._basis_grads.get(id(layer), []) for _, layer in group.layers]
    bad_grads = _modules_with_nonfinite(group, grads)
    if not bad_grads:
        return False
    warnings.warn(
        f"Optimizer step {step}: non-finite basis gradients in {bad_grads} (adapter {group.name!r}); the "
        "augmentation of this step is skipped and the ranks stay as they are.",
        stacklevel=3,
    )
    return True


CALL_ORDER = (
    "Call order, once per optimizer step: loss.backward(), updater.before_step(), optimizer.step(), "
    "updater.after_step(), optimizer.zero_grad()."
)


def check_optimizer_holds_cores(updater: Any) -> None:
    """The optimizer given to the updater must step every core the updater manages (its state follows each cycle).

    Raises:
        `ValueError`: naming the cores the optimizer does not hold.
    """
    if updater.optimizer is None:
        return
    held = {id(p) for group in updater.optimizer.param_groups for p in group["params"]}
    missing = [
        f"{module}.tucker_core.{group.name}"
        for group in updater.groups
        for module, layer in group.layers
        if id(layer.tucker_core[group.name]) not in held
    ]
    if missing:
        raise ValueError(
            f"The optimizer passed to TuckerRankUpdater does not hold these Tucker cores: {missing}. Build it from "
            "the model's trainable parameters after adding the adapters (e.g. `AdamW(model.parameters())`), or pass "
            "`optimizer=None` to leave optimizer state alone."
        )


def count_optimizer_steps(updater: Any) -> None:
    """Counts the steps of the updater's optimizer with a step post-hook: a Python counter for the call-order checks
    (reading Adam's `state["step"]` instead would read a tensor on every step, a device sync when it lives on an
    accelerator). The hook holds the updater weakly and is removed when the updater goes."""
    updater._optimizer_step_count = 0
    if updater.optimizer is None:
        return
    ref = weakref.ref(updater)

    def count(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        owner = ref()
        if owner is not None:
            owner._optimizer_step_count += 1

    handle = updater.optimizer.register_step_post_hook(count)
    weakref.finalize(updater, handle.remove)


def _optimizer_steps(updater: Any) -> int | None:
    """How many times the optimizer stepped since the updater was made; None without an optimizer."""
    if updater.optimizer is None:
        return None
    return getattr(updater, "_optimizer_step_count", 0)


def _check_adapters_exist(updater: Any) -> None:
    for group in updater.groups:
        if any(group.name not in layer.tucker_core for _, layer in group.layers):
            raise RuntimeError(
                f"Adapter {group.name!r}, managed by this TuckerRankUpdater, is no longer in the model (deleted with "
                "`delete_adapter`?). Make a new TuckerRankUpdater for the adapters that remain."
            )


def check_before_step(updater: Any) -> None:
    """Misuse caught at `before_step()`: twice for one step, or after `optimizer.step()` (which then stepped the
    bases), or with the managed adapter deleted.

    Raises:
        `RuntimeError`: with the right call order.
    """
    _check_adapters_exist(updater)
    n = updater.step + 1
    if getattr(updater, "_before_step_done", False):
        raise RuntimeError(f"before_step() was called twice for optimizer step {n}. {CALL_ORDER}")
    recorded, now = getattr(updater, "_optimizer_steps", None), _optimizer_steps(updater)
    if recorded is not None and now is not None and now > recorded:
        raise RuntimeError(
            f"optimizer.step() ran before before_step() at optimizer step {n}: the optimizer stepped the bases with "
            f"their gradients ({now - recorded} optimizer step(s) since the last after_step()). {CALL_ORDER}"
        )
    updater._before_step_done = True


def check_after_step(updater: Any) -> None:
    """Misuse caught at `after_step()`: `before_step()` forgotten, `after_step()` twice, the adapter deleted.

    Raises:
        `RuntimeError`: with the right call order.
    """
    _check_adapters_exist(updater)
    if getattr(updater, "_before_step_done", False):
        return
    n = updater.step + 1
    recorded, now = getattr(updater, "_optimizer_steps", None), _optimizer_steps(updater)
    if recorded is not None and now is not None and now == recorded:
        raise RuntimeError(
            f"after_step() was called twice in a row (no optimizer.step() since the last one), at step {n}. "
            f"{CALL_ORDER}"
        )
    raise RuntimeError(
        f"after_step() without before_step() at optimizer step {n}: before_step() was forgotten (so the optimizer "
        f"stepped the bases), or after_step() was called twice. {CALL_ORDER}"
    )
