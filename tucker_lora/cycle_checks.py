"""Checks around the rank cycle of `TuckerRankUpdater`: adapter weights replaced behind its back, non-finite
gradients and cores at cycle events, and misuse of the `before_step()` / `optimizer.step()` / `after_step()` order.

Kept apart from `rank_updater.py` so that the cycle itself stays short: every check is one call from there.
"""

from __future__ import annotations

import logging
from typing import Any

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
