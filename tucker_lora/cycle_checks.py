"""Checks around the rank cycle of `TuckerRankUpdater`: adapter weights replaced behind its back, non-finite
gradients and cores at cycle events, and misuse of the `before_step()` / `optimizer.step()` / `after_step()` order.

Kept apart from `rank_updater.py` so that the cycle itself stays short: every check is one call from there.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

logger = logging.getLogger(__name__)


def core_fingerprints(group: Any) -> dict[str, tuple[int, int]]:
    """Identity and in-place version counter of every core of `group`: both change when anything but the updater's
    own cycle writes the cores after the latest `after_step()` (`load_adapter`, `load_state_dict`)."""
    return {module: (id(layer.tucker_core[group.name]), layer.tucker_core[group.name]._version)
            for module, layer in group.layers}  # fmt: skip


def record_cores(updater: Any) -> None:
    """Remember the cores as the updater left them (end of `after_step()`)."""
    updater._core_fingerprints = {group.name: core_fingerprints(group) for group in updater.groups}


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


def _finite(tensor: torch.Tensor | None) -> bool:
    return tensor is None or bool(torch.isfinite(tensor).all())


def skip_nonfinite_event(updater: Any, group: Any, action: str, step: int) -> bool:
    """Checks the inputs of the cycle event `action` ending optimizer step `step` before it runs.

    A non-finite basis gradient at an augmentation (an fp16 loss scaler's overflow step, a NaN loss) would write NaN
    into the bases: the augmentation is skipped with a warning naming the step and the layers, and the cycle goes on
    (the truncation that follows works on the unaugmented adapter). A non-finite core means the optimizer already
    stepped a non-finite gradient: continuing would spread it into the bases, so this raises.

    Returns:
        `bool`: whether to skip the event.

    Raises:
        `FloatingPointError`: if a core of `group` holds NaN or inf.
    """
    bad_cores = [module for module, layer in group.layers if not _finite(layer.tucker_core[group.name])]
    if bad_cores:
        raise FloatingPointError(
            f"Tucker cores of adapter {group.name!r} hold NaN or inf after optimizer step {step}, in {bad_cores}: the "
            "optimizer stepped a non-finite gradient. Lower the learning rate, clip gradients, or skip non-finite "
            "steps (an fp16 loss scaler does), and resume from a checkpoint."
        )
    if action != "augment":
        return False
    bad_grads = [
        module
        for module, layer in group.layers
        if not all(_finite(grad) for grad in updater._basis_grads.get(id(layer), []))
    ]
    if not bad_grads:
        return False
    warnings.warn(
        f"Optimizer step {step}: non-finite basis gradients in {bad_grads} (adapter {group.name!r}); the "
        "augmentation of this step is skipped and the ranks stay as they are.",
        stacklevel=3,
    )
    return True
