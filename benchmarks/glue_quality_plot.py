"""The quality benchmark's figures: per task, the score against active trainable parameters, one curve per method
(its variants at other ranks or tolerances are the curve's points); the training losses; each method's gap to LoRA
r=8 on the same seeds."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

MARKERS = {
    "tucker": ("o", "tab:blue"),
    "tucker alpha 16": ("o", "lightsteelblue"),
    "tucker budget 70%": ("D", "tab:purple"),
    "lora": ("s", "tab:orange"),
    "adalora": ("^", "tab:green"),
}
# families without a style of their own (a preset's newer Tucker settings), in order of appearance
OTHER_STYLES = [("v", "tab:red"), ("P", "tab:brown"), ("X", "tab:pink"), ("<", "tab:cyan"), ("h", "tab:olive")]
TITLE_INCHES_PER_CHAR = 0.105  # a title's width per character at matplotlib's default 12 pt


def figure_width(panel_inches: float, panels: int, title: str, fontsize: float = 12.0) -> float:
    """Inches for `panels` panels side by side, and never narrower than the title (one task's panel alone cut a
    preset's long name off)."""
    return max(panel_inches * panels, TITLE_INCHES_PER_CHAR * fontsize / 12.0 * len(title))


def family_styles(families: list[str]) -> dict[str, tuple[str, str]]:
    """`(marker, color)` per family: the fixed ones of `MARKERS`, the others in turn from `OTHER_STYLES`."""
    others = itertools.cycle(OTHER_STYLES)
    return {family: MARKERS.get(family) or next(others) for family in dict.fromkeys(families)}


def majority_on_axis(majority: float, means: list[float], stds: list[float]) -> bool:
    """Whether the majority-class line is drawn: only when it lies within the methods' own range plus as much again
    (at least 5 points) below it; far below, it would squash the curves into a flat line, and is named instead."""
    spreads = [s if math.isfinite(s) else 0.0 for s in stds]  # one seed: no spread
    low = min(m - s for m, s in zip(means, spreads))
    high = max(m + s for m, s in zip(means, spreads))
    return majority >= low - max(5.0, high - low)


def plot_quality(summary: dict, path: Path, title: str) -> Path:
    """Writes one panel per task: mean dev score (error bar: std over seeds) against the share of LoRA r=8's
    parameters. Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(cell["task"] for cell in summary["cells"].values()))
    if not tasks:
        raise ValueError("nothing to plot: the summary has no finished runs")
    fig, axes = plt.subplots(1, len(tasks), figsize=(figure_width(3.6, len(tasks), title), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        cells = [c for c in summary["cells"].values() if c["task"] == task]
        styles = family_styles([c.get("family", c["method"]) for c in cells])
        all_means, all_stds = [], []
        for name, (marker, color) in styles.items():
            # one method's settings (LoRA's ranks, Tucker's tau) as one curve, by parameter share
            points = sorted(
                (
                    (100 * c["active_trainable_parameters"]["mean"] / c["lora_r8_parameters"], c)
                    for c in cells
                    if c.get("family", c["method"]) == name
                ),
                key=lambda point: point[0],
            )
            shares = [share for share, _ in points]
            means = [100 * c["score"]["mean"] for _, c in points]
            stds = [100 * c["score"]["std"] for _, c in points]
            all_means += means
            all_stds += stds
            n = min(c["score"]["n"] for _, c in points)
            ax.errorbar(shares, means, yerr=stds, fmt=marker + "-", color=color, capsize=3, linewidth=1,
                        label=f"{name} (n={n})")  # fmt: skip
        ax.axvline(70, color="gray", linestyle=":", linewidth=1)  # the goal's parameter budget
        majority = next((c["majority_score"] for c in cells if c.get("majority_score") is not None), None)
        if majority is not None and majority_on_axis(100 * majority, all_means, all_stds):
            # a run at this line learned nothing
            ax.axhline(100 * majority, color="gray", linestyle="--", linewidth=1, label="majority class")
        ax.set_title(task if majority is None else f"{task} (majority class {100 * majority:.1f})")
        ax.set_xlabel("active params, % of LoRA r=8")
        ax.set_ylabel(next(c["metric"] for c in summary["cells"].values() if c["task"] == task) + " (x100)")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def seed_band(seeds: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """One method's loss over its seeds (each `{step: loss}`): the steps every seed logged, and at each the mean,
    the lowest and the highest loss (a seed's line would hide the others; 35 runs in one panel are unreadable)."""
    steps = sorted(set.intersection(*(set(seed) for seed in seeds))) if seeds else []
    losses = [[seed[step] for seed in seeds] for step in steps]
    return steps, [sum(v) / len(v) for v in losses], [min(v) for v in losses], [max(v) for v in losses]


def plot_loss_curves(runs: list[dict], path: Path, title: str) -> Path | None:
    """Writes one panel per task: the training loss logged by each run (`trainer_state.json` in its `output_dir`),
    one line per method (the mean over its seeds, their range as a band), coloured by method family. Returns
    `path`, or `None` when no run logged a loss."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    for run in runs:
        state = Path(run.get("output_dir", "")) / "trainer_state.json"
        if not state.is_file():
            continue
        history = json.loads(state.read_text(encoding="utf-8"))["log_history"]
        points = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
        if points:
            curves.append((run, points))
    if not curves:
        return None
    tasks = list(dict.fromkeys(run["task"] for run, _ in curves))
    fig, axes = plt.subplots(1, len(tasks), figsize=(figure_width(4.5, len(tasks), title), 3.6), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, task in zip(axes[0], tasks):
        mine = [(run, points) for run, points in curves if run["task"] == task]
        family_of = {run["method"]: run.get("family", run["method"]) for run, _ in mine}  # in order of appearance
        colors = family_styles(list(family_of.values()))
        for method, family in family_of.items():
            seeds = [dict(points) for run, points in mine if run["method"] == method]
            _, color = colors[family]
            siblings = [m for m, f in family_of.items() if f == family]  # one colour, told apart by line style
            steps, mean, low, high = seed_band(seeds)
            if not steps:
                continue
            ax.plot(steps, mean, styles[siblings.index(method) % len(styles)], color=color, linewidth=1.2,
                    label=f"{method} (n={len(seeds)})")  # fmt: skip
            if len(seeds) > 1:
                ax.fill_between(steps, low, high, color=color, alpha=0.12)
        ax.set_title(task)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_paired(summary: dict, path: Path, title: str) -> Path | None:
    """Writes one panel per task: for each method, its score minus LoRA r=8's on each seed (dots), their mean
    (diamond) and, where the runs saved per-row predictions, the mean's 95% interval over the evaluation rows (bar:
    +- 1.96 standard errors of a paired bootstrap; the seeds share the rows, so more seeds do not narrow it).
    Returns `path`, or `None` when no method was paired with LoRA r=8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(summary.get("paired_vs_lora", {}).values())
    if not cells:
        return None
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    rows = max(sum(c["task"] == task for c in cells) for task in tasks)
    title = title + ": gap to LoRA r=8 (dots: seeds; bar: 95% over the rows)"
    width = figure_width(4.8, len(tasks), title, fontsize=9)
    fig, axes = plt.subplots(1, len(tasks), figsize=(width, 1.2 + 0.45 * rows), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [c for c in cells if c["task"] == task]
        for y, cell in enumerate(mine):
            gaps = [100 * g for g in cell.get("per_seed", {}).values()]
            ax.scatter(gaps, [y] * len(gaps), s=14, color="gray", zorder=2)
            mean, se = 100 * cell["difference"]["mean"], cell.get("se_over_rows")
            xerr = None if se is None else 1.96 * 100 * se
            ax.errorbar([mean], [y], xerr=xerr, fmt="D", color="tab:blue", capsize=3, zorder=3)
        ax.axvline(0, color="tab:orange", linewidth=1)  # LoRA r=8
        ax.set_yticks(range(len(mine)), [c["method"] for c in mine], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(task)
        ax.set_xlabel("score minus LoRA r=8's, same seed (points)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
