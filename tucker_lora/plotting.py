"""`plot_ranks`: a PNG of the ranks per module and the active parameter count over a training run."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

RANK_PREFIX = "tucker_rank/"
ACTIVE_KEY = "tucker_active_params"
BUDGET_KEY = "tucker_param_budget"


def _load_history(source: str | os.PathLike | Sequence[dict]) -> list[dict]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / "trainer_state.json"
        if not path.is_file():
            raise ValueError(
                f"`source` must be a log history, a trainer_state.json or a folder holding one; got {path}"
            )
        return json.loads(path.read_text())["log_history"]
    return list(source)


def rank_series(source: str | os.PathLike | Sequence[dict]) -> tuple[dict[str, list[tuple[int, float]]], list]:
    """Per rank key (`tucker_rank/<module>/<mode>`) the `(step, rank)` points, and the `(step, active params)` points.

    Args:
        source (`str`, `os.PathLike` or `Sequence[dict]`): `trainer.state.log_history`, a `trainer_state.json`, or
            an output/checkpoint folder holding one.
    """
    ranks: dict[str, dict[int, float]] = {}
    active: dict[int, float] = {}
    for entry in _load_history(source):
        step = entry.get("step")
        if step is None:
            continue
        # one point per step, the latest entry's: the callback's record of a change and the Trainer's log of the
        # same step hold the same values
        for key, value in entry.items():
            if key.startswith(RANK_PREFIX):
                ranks.setdefault(key[len(RANK_PREFIX) :], {})[step] = value
        if ACTIVE_KEY in entry:
            active[step] = entry[ACTIVE_KEY]
    return {key: sorted(points.items()) for key, points in ranks.items()}, sorted(active.items())


def budget_series(source: str | os.PathLike | Sequence[dict]) -> list[tuple[int, float]]:
    """The `(step, parameter budget)` points of a run with `param_budget` (empty without one).

    Args:
        source (`str`, `os.PathLike` or `Sequence[dict]`): as for `rank_series`.
    """
    points = {e["step"]: e[BUDGET_KEY] for e in _load_history(source) if e.get("step") is not None and BUDGET_KEY in e}
    return sorted(points.items())


def plot_ranks(
    source: str | os.PathLike | Sequence[dict], output_path: str | os.PathLike, max_legend: int = 12
) -> Path:
    """
    Draws the ranks per module over the optimizer steps and the active adapter parameter count, into a PNG.

    Needs a run logged with `TuckerRankCallback` (it adds `tucker_rank/...` and `tucker_active_params` to the logs).
    A run with `param_budget` also logs `tucker_param_budget`, drawn as a dashed line over the active parameters.

    Args:
        source (`str`, `os.PathLike` or `Sequence[dict]`): `trainer.state.log_history`, a `trainer_state.json`, or
            an output/checkpoint folder holding one.
        output_path (`str` or `os.PathLike`): where to write the PNG.
        max_legend (`int`): the legend names modules only up to this many lines.

    Returns:
        `Path`: the PNG written.

    Example:

    ```python
    tucker_lora.plot_ranks(trainer.state.log_history, "ranks.png")
    ```
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks, active = rank_series(source)
    budget = budget_series(source)
    if not ranks:
        raise ValueError(
            f"no `{RANK_PREFIX}...` entries in the log history: train with TuckerRankCallback and logging_steps set"
        )
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for key, points in sorted(ranks.items()):
        steps, values = zip(*points)
        top.step(steps, values, where="post", label=key, linewidth=1)
    top.set_ylabel("rank")
    top.set_title("Tucker ranks per module and mode")
    if len(ranks) <= max_legend:
        top.legend(fontsize="small")
    if active:
        steps, values = zip(*active)
        bottom.step(steps, values, where="post", marker=".", label="active")  # the count changes at truncations
    if budget:
        steps, values = zip(*budget)
        bottom.step(steps, values, where="post", linestyle="--", color="black", label="param_budget")
        bottom.legend(fontsize="small")
    bottom.set_ylabel("active adapter parameters")
    bottom.set_xlabel("optimizer step")
    figure.tight_layout()
    output_path = Path(output_path)
    figure.savefig(output_path, dpi=100)
    plt.close(figure)
    return output_path
