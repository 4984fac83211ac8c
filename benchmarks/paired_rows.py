"""Two methods compared on the same rows: per-seed scores, the paired gap and how much of it is the rows' sampling.

The GLUE recipe writes each run's per-row predictions (`predictions.json`); runs of two methods with the same seeds,
data and evaluation rows can then be compared row by row. Two sources of noise are reported apart:

* **seeds**: the gap per seed (method minus reference, same seed, so the same data order and subset), as mean +- std
  over the seeds and the number of seeds at or above;
* **rows**: the runs are deterministic, so the seeds do not resample the evaluation rows, and a mean over seeds still
  carries the sampling error of those rows. A paired bootstrap over rows (the same resampled rows for every run)
  gives the standard error of the seed-averaged gap and a 95% interval: how far another sample of rows of the same
  kind could move it (0.5 points on SST-2's 872 dev sentences for two methods that disagree on 6% of them).

```bash
python benchmarks/paired_rows.py --runs 'outputs/sweep/tucker_*' --against 'outputs/sweep/lora_*' \\
    --output benchmarks/results/paired_rows_sst2_heldout.json
```

Every run is a `recipes/glue/finetune.py` output folder (`metrics.json` and `predictions.json`). The split is the
runs' main one (`metrics.json`'s `eval_on`) unless `--split` names another; the metric is the task's main one unless
`--metric` names another of the task's, or `roc_auc` for a two-class task: the area under the ROC curve of the rows'
scores (the logit margins the recipe writes since 2026-12-07), which does not depend on the decision threshold.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "recipes" / "glue"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_report  # noqa: E402  (a sibling file, not a package)
from metrics import METRICS  # noqa: E402  (the recipe's metrics, so the scores are the recipe's own)
from tasks import get_task  # noqa: E402


def load_run(folder: str) -> dict:
    """A run's seed, method, task, main metric and per-row predictions, with a clear error for what is missing."""
    path = Path(folder)
    for name in ("metrics.json", "predictions.json"):
        if not (path / name).is_file():
            old = name == "predictions.json"
            hint = " (runs of the recipe before 2026-12-07 did not write it; rerun them)" if old else ""
            raise FileNotFoundError(f"`--runs`/`--against` folder {folder} has no {name}{hint}")
    metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    predictions = json.loads((path / "predictions.json").read_text(encoding="utf-8"))
    return {
        "folder": str(path), "seed": metrics["seed"], "method": metrics["method"], "task": metrics["task"],
        "metric": metrics["main_metric"]["name"], "eval_on": metrics["eval_on"], "splits": predictions,
    }  # fmt: skip


def expand(patterns: list[str], flag: str) -> list[dict]:
    """The runs of one side: every folder that the patterns match, one per seed."""
    folders = sorted({f for pattern in patterns for f in (glob.glob(pattern) or [pattern])})
    runs = [load_run(f) for f in folders]
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"`{flag}` must hold one run per seed; got seeds {seeds} from {folders}")
    return runs


def pair_by_seed(runs: list[dict], against: list[dict]) -> list[tuple[dict, dict]]:
    """The runs of both sides with the same seed, in seed order; every seed must be on both sides."""
    mine, theirs = {r["seed"]: r for r in runs}, {r["seed"]: r for r in against}
    if set(mine) != set(theirs):
        raise ValueError(f"`--runs` and `--against` must have the same seeds; got {sorted(mine)} and {sorted(theirs)}")
    return [(mine[seed], theirs[seed]) for seed in sorted(mine)]


def rows_of(
    pairs: list[tuple[dict, dict]], split: str, field: str = "predictions"
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """The split's labels (checked equal in every run: the same rows in the same order) and each side's per-row
    `field` (`predictions`, or `scores` for ROC AUC) per pair."""
    labels = None
    for run in (run for pair in pairs for run in pair):
        if split not in run["splits"]:
            raise ValueError(f"`--split` {split!r} is not in {run['folder']}; it has {sorted(run['splits'])}")
        mine = np.asarray(run["splits"][split]["labels"])
        if labels is None:
            labels, first = mine, run["folder"]
        elif mine.shape != labels.shape or not np.array_equal(mine, labels):
            raise ValueError(
                f"runs must be evaluated on the same rows; the labels of {split!r} differ between {first} and "
                f"{run['folder']} ({labels.shape[0]} and {mine.shape[0]} rows)"
            )
        if field not in run["splits"][split]:
            raise ValueError(
                f"{run['folder']} has no per-row {field} for {split!r} (the recipe writes scores for two-class tasks "
                "since 2026-12-07; rerun older runs)"
            )
    values = [[np.asarray(run["splits"][split][field]) for run in pair] for pair in pairs]
    return labels, [v[0] for v in values], [v[1] for v in values]


def row_bootstrap(metric, labels, runs, against, resamples: int, seed: int) -> np.ndarray:
    """The seed-averaged gap on `resamples` resamples of the rows, drawn with replacement, the same rows for every
    run of both sides."""
    rng = np.random.default_rng(seed)
    gaps = np.empty(resamples)
    for i in range(resamples):
        rows = rng.integers(0, len(labels), len(labels))
        gaps[i] = statistics.fmean(
            metric(mine[rows], labels[rows]) - metric(theirs[rows], labels[rows])
            for mine, theirs in zip(runs, against)
        )
    return gaps


def metric_of(task_name: str, name: str | None) -> str:
    """The metric to compare: `name` if the task has it (its GLUE metrics, or `roc_auc` for a two-class task), else
    a clear error; `None`: the task's main metric."""
    task = get_task(task_name)
    if name is None:
        return task.main_metric
    allowed = list(task.metrics) + (["roc_auc"] if task.num_labels == 2 else [])
    if name not in allowed:
        raise ValueError(f"`--metric` must be one of {task_name}'s {allowed}; got {name!r}")
    return name


def compare(
    pairs: list[tuple[dict, dict]], split: str, resamples: int = 2000, seed: int = 0, metric_name: str | None = None
) -> dict:
    """Per-seed scores and gaps on `split`, their mean +- std over seeds, and the gap's standard error over rows."""
    name = metric_of(pairs[0][0]["task"], metric_name)
    metric = METRICS[name]
    field = "scores" if name == "roc_auc" else "predictions"
    labels, runs, against = rows_of(pairs, split, field)
    classes = not get_task(pairs[0][0]["task"]).is_regression
    # "rows predicted differently" counts class predictions, whatever the metric compares
    predictions = (runs, against) if field == "predictions" else rows_of(pairs, split)[1:]
    per_seed = []
    for index, ((run, other), mine, theirs) in enumerate(zip(pairs, runs, against)):
        score, reference = metric(mine, labels), metric(theirs, labels)
        differ = float(np.mean(predictions[0][index] != predictions[1][index])) if classes else None
        per_seed.append({
            "seed": run["seed"], "score": score, "against": reference, "gap": score - reference,
            "disagreement": differ,
        })  # fmt: skip
    gaps = [p["gap"] for p in per_seed]
    boot = row_bootstrap(metric, labels, runs, against, resamples, seed)
    return {
        "split": split, "metric": name, "rows": int(len(labels)), "seeds": len(pairs), "per_seed": per_seed,
        "score_mean": statistics.fmean(p["score"] for p in per_seed),
        "against_mean": statistics.fmean(p["against"] for p in per_seed),
        "gap_mean": statistics.fmean(gaps),
        "gap_std_over_seeds": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
        "seeds_at_or_above": sum(g >= 0 for g in gaps),
        "gap_se_over_rows": float(boot.std(ddof=1)),
        "gap_95_interval_over_rows": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "bootstrap": {"resamples": resamples, "seed": seed},
    }  # fmt: skip


def markdown(result: dict, label: str, against_label: str) -> str:
    pct = 100.0
    head = (
        f"{label} against {against_label} on `{result['split']}` ({result['rows']:,} rows), {result['metric']} x 100, "
        f"{result['seeds']} seeds\n\n"
        "| seed | " + label + " | " + against_label + " | gap | rows predicted differently |\n|---|---|---|---|---|"
    )
    lines = [
        f"| {p['seed']} | {pct * p['score']:.2f} | {pct * p['against']:.2f} | {pct * p['gap']:+.2f} | "
        + ("-" if p["disagreement"] is None else f"{pct * p['disagreement']:.1f}%")
        + " |"
        for p in result["per_seed"]
    ]
    low, high = result["gap_95_interval_over_rows"]
    summary = (
        f"| mean | {pct * result['score_mean']:.2f} | {pct * result['against_mean']:.2f} | "
        f"{pct * result['gap_mean']:+.2f} | |\n\n"
        f"gap over seeds: {pct * result['gap_mean']:+.2f} +- {pct * result['gap_std_over_seeds']:.2f} (std), "
        f"{result['seeds_at_or_above']} of {result['seeds']} seeds at or above; over rows (paired bootstrap, "
        f"{result['bootstrap']['resamples']} resamples): standard error {pct * result['gap_se_over_rows']:.2f}, "
        f"95% interval [{pct * low:+.2f}, {pct * high:+.2f}]"
    )
    return "\n".join([head, *lines, summary])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run folders (or glob patterns) of the method")
    parser.add_argument("--against", nargs="+", required=True, help="run folders (or patterns) of the reference")
    parser.add_argument("--split", default=None, help="evaluated split to compare; default: the runs' main one")
    parser.add_argument("--metric", default=None, help="a metric of the task, or roc_auc; default: its main one")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the rows")
    parser.add_argument("--label", default=None, help="name of the method in the table; default: its recipe method")
    parser.add_argument("--against_label", default=None, help="name of the reference; default: its recipe method")
    parser.add_argument("--output", type=Path, default=None, help="JSON report; the table goes beside it as .md")
    args = parser.parse_args(argv)
    if args.resamples < 2:
        raise ValueError(f"`--resamples` must be >= 2; got {args.resamples}")
    pairs = pair_by_seed(expand(args.runs, "--runs"), expand(args.against, "--against"))
    tasks = {run["task"] for pair in pairs for run in pair}
    if len(tasks) != 1:
        raise ValueError(f"`--runs` and `--against` must be runs of one task; got {sorted(tasks)}")
    split = args.split or pairs[0][0]["eval_on"]
    result = compare(pairs, split, args.resamples, metric_name=args.metric)
    label = args.label or pairs[0][0]["method"]
    against_label = args.against_label or pairs[0][1]["method"]
    if label == against_label:
        raise ValueError(f"`--label` and `--against_label` must differ to tell the columns apart; both are {label!r}")
    report = {
        "date": datetime.date.today().isoformat(), "task": tasks.pop(), "label": label,
        "against_label": against_label, "runs": [p[0]["folder"] for p in pairs],
        "against": [p[1]["folder"] for p in pairs], "result": result,
    }  # fmt: skip
    write_report(report, markdown(result, label, against_label), args.output)
    return report


if __name__ == "__main__":
    main()
