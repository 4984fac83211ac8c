"""The quality benchmark's figure: per task, dev score against active trainable parameters, one marker per method."""

from __future__ import annotations

from pathlib import Path

MARKERS = {"tucker": ("o", "tab:blue"), "lora": ("s", "tab:orange"), "adalora": ("^", "tab:green")}


def plot_quality(summary: dict, path: Path, title: str) -> Path:
    """Writes one panel per task: mean dev score (error bar: std over seeds) against the share of LoRA r=8's
    parameters. Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(cell["task"] for cell in summary["cells"].values()))
    if not tasks:
        raise ValueError("nothing to plot: the summary has no finished runs")
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for cell in (c for c in summary["cells"].values() if c["task"] == task):
            marker, color = MARKERS.get(cell["method"], ("x", "black"))
            share = 100 * cell["active_trainable_parameters"]["mean"] / cell["lora_r8_parameters"]
            score = cell["score"]
            ax.errorbar(share, 100 * score["mean"], yerr=100 * score["std"], fmt=marker, color=color, capsize=3,
                        label=f"{cell['method']} (n={score['n']})")  # fmt: skip
        ax.axvline(70, color="gray", linestyle=":", linewidth=1)  # the goal's parameter budget
        ax.set_title(task)
        ax.set_xlabel("active params, % of LoRA r=8")
        ax.set_ylabel(next(c["metric"] for c in summary["cells"].values() if c["task"] == task) + " (x100)")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
