"""The GLUE quality benchmark runner: presets, aggregation over seeds, the table, and one tiny real run."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
from glue_fixtures import REPO

spec = importlib.util.spec_from_file_location("glue_quality", REPO / "benchmarks" / "glue_quality.py")
glue_quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(glue_quality)


def fake_run(task: str, method: str, seed: int, value: float, active: int, majority: float | None = None) -> dict:
    return {"task": task, "method": method, "seed": seed, "metric": "accuracy", "value": value, "majority": majority,
            "active_trainable_parameters": active, "lora_r8_parameters": 1000, "wall_time_s": 10.0 + seed}  # fmt: skip


TRAIN_ROWS = {"cola": 8551, "sst2": 67349, "mrpc": 3668, "rte": 2490}  # the local GLUE training sets


def test_presets_load_with_the_head_trained_and_the_long_one_at_scale():
    for name, tasks in (("quick", ["mrpc", "sst2"]), ("full", ["cola", "mrpc", "rte", "sst2"])):
        preset = glue_quality.load_preset(name)
        assert sorted(preset["tasks"]) == tasks
        assert len(preset["seeds"]) >= 3 and preset["methods"] == ["tucker", "lora", "adalora", "tucker_budget70"]
        assert preset["tasks"]["sst2"]["max_train_samples"] < 67349  # a documented SST-2 subset
        assert preset["common"]["modules_to_save"] == ["classifier", "pooler"]  # MRPC learns nothing without it
        assert preset["tucker"]["absorb_core"] is True  # the main command's form
    for task, options in preset["tasks"].items():  # the full preset: >= 1,500 optimizer steps per run
        rows = min(options.get("max_train_samples", TRAIN_ROWS[task]), TRAIN_ROWS[task])
        steps = -(-rows // preset["common"]["per_device_train_batch_size"]) * options["num_train_epochs"]
        assert steps >= 1500, (task, steps)
    # Tucker at 70% of LoRA r=8's adapter parameters: the budget decides (tau 0.01), with Tucker's chosen rate
    options = glue_quality.run_options(
        preset, "sst2", "tucker_budget70", 0, {"tucker": {"tau": 0.25, "learning_rate": 3e-3}}
    )
    assert (options["method"], options["budget_fraction_of_lora"], options["tau"]) == ("tucker", 0.7, 0.01)
    assert options["learning_rate"] == 3e-3
    with pytest.raises(ValueError, match=r"`--preset` must be one of \['full', 'quick', .*\] or a JSON file; got 'fa"):
        glue_quality.load_preset("fast")


def test_variants_draw_a_method_at_other_settings(tmp_path: Path):
    """`variants` (LoRA's rank curve, Tucker at several tau): the recipe method and the variant's values win over the
    method's own; the summary keeps each variant apart and names its family, which the figure draws as one curve."""
    preset = glue_quality.load_preset("sst2_curve")
    curve = {"lora", "lora_r2", "lora_r4", "lora_r16", "tucker", "tucker_tau20", "tucker_tau30"}
    assert curve <= set(preset["methods"])
    options = glue_quality.run_options(preset, "sst2", "lora_r2", 0)
    assert options["method"] == "lora" and options["rank"] == 2 and options["alpha"] == 16
    options = glue_quality.run_options(preset, "sst2", "tucker_tau30", 0, {"tucker": {"tau": 0.1, "r_max": 12}})
    assert options["method"] == "tucker" and options["tau"] == 0.3 and options["r_max"] == 12
    options = glue_quality.run_options(preset, "sst2", "tucker_budget70", 0)
    assert options["method"] == "tucker" and options["tau"] == 0.01 and options["freeze_ranks_after"] == 0.5
    assert "family" not in options and glue_quality.family(preset, "tucker_budget70") == "tucker budget 70%"
    assert glue_quality.run_options(preset, "sst2", "tucker", 0)["alpha"] == 64
    folded = glue_quality.run_options(preset, "sst2", "tucker_folded", 0)
    assert folded["absorb_core"] is True and folded["alpha"] == 8 and folded["budget_fraction_of_lora"] == 0.7
    assert "--absorb_core" in glue_quality.to_argv(folded)
    runs = [fake_run("sst2", "lora", 0, 0.85, 1000), fake_run("sst2", "lora_r2", 0, 0.80, 250),
            fake_run("sst2", "tucker", 0, 0.86, 400)]  # fmt: skip
    summary = glue_quality.aggregate(runs, {"tasks": {"sst2": {}}, "methods": ["lora", "lora_r2", "tucker"],
                                            "variants": preset["variants"]})  # fmt: skip
    families = {name: cell["family"] for name, cell in summary["cells"].items()}
    assert families == {"sst2/lora": "lora", "sst2/lora_r2": "lora", "sst2/tucker": "tucker"}
    assert glue_quality.plot_quality(summary, tmp_path / "curve.png", "t").stat().st_size > 0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**{k: preset[k] for k in ("seeds", "tasks", "common")}, "methods": ["lora_r2"],
                                "variants": {"lora_r2": {"method": "dora", "rank": 2}}}))  # fmt: skip
    with pytest.raises(ValueError, match=r"`variants.lora_r2.method` must be one of \['tucker', 'lora', 'adalora'\]"):
        glue_quality.load_preset(str(path))


def test_figure_styles_tell_families_apart_and_keep_close_curves_readable():
    plot = sys.modules["glue_quality_plot"]  # imported by glue_quality from its folder
    styles = plot.family_styles(["lora", "tucker absorb_core", "tucker absorb_core, LoRA's steps", "lora", "adalora"])
    assert list(styles) == ["lora", "tucker absorb_core", "tucker absorb_core, LoRA's steps", "adalora"]
    assert styles["lora"] == plot.MARKERS["lora"] and len(set(styles.values())) == 4  # no two families alike
    # SST-2's majority rate 50.9 far below methods at 82-84: named in the title, not drawn (it would flatten them)
    assert plot.majority_on_axis(50.9, [83.0, 83.8], [1.0, 0.8]) is False
    # MRPC's 68.4 just below methods at 71-76: drawn; CoLA's MCC 0 beside a one-seed run at 0: drawn
    assert plot.majority_on_axis(68.4, [75.7, 70.9], [1.5, 1.0]) is True
    assert plot.majority_on_axis(0.0, [0.0, 5.0], [float("nan"), 0.0]) is True
    # one task's panel is widened to its title; several panels already are wide enough
    title = "GLUE quality, preset sst2_fresh_curve, minilm"
    assert plot.figure_width(3.6, 1, title) == pytest.approx(plot.TITLE_INCHES_PER_CHAR * len(title))
    assert plot.TITLE_INCHES_PER_CHAR * len(title) > 3.6
    assert plot.figure_width(3.6, 2, title) == 7.2
    assert plot.figure_width(4.8, 1, title, fontsize=6) == 4.8


def test_budget_runs_report_their_adapter_only_fraction():
    runs = [{**fake_run("rte", "tucker_budget70", seed, 0.6, 766), "active_adapter_parameters": 700 - seed,
             "lora_r8_adapter_parameters": 1000} for seed in (0, 1)]  # fmt: skip
    preset = {
        "tasks": {"rte": {}},
        "methods": ["tucker_budget70"],
        "variants": {"tucker_budget70": {"method": "tucker"}},
    }
    summary = glue_quality.aggregate(runs, preset)
    assert summary["cells"]["rte/tucker_budget70"]["adapter_fraction_of_lora_r8"] == pytest.approx(0.6995)
    assert summary["overall"]["tucker_budget70"]["adapter_fraction_of_lora_r8"] == pytest.approx(0.6995)
    record = {"preset": "t", "model": "m", "seeds": [0, 1], "notes": "", "common": {}, "method_settings": {},
              "method_settings_source": "s", "environment": {"commit": "c", "date": "d"},
              "summary": summary}  # fmt: skip
    assert "| tucker_budget70 | 60.00 | 77% | 70.0% |" in glue_quality.markdown(record)


def test_aggregate_means_stds_and_goal(tmp_path: Path):
    preset = {"tasks": {"rte": {}, "sst2": {}}, "methods": ["tucker", "lora", "adalora"]}
    runs = []
    for seed, (t, lo, ada) in enumerate([(0.6, 0.5, 0.55), (0.7, 0.6, 0.55), (0.8, 0.7, 0.55)]):
        for task in ("rte", "sst2"):
            majority = 0.5123 if task == "sst2" else None  # rte's runs stand for older records without one
            runs += [fake_run(task, "tucker", seed, t, 600, majority),
                     fake_run(task, "lora", seed, lo, 1000, majority),
                     fake_run(task, "adalora", seed, ada, 900)]  # fmt: skip
    summary = glue_quality.aggregate(runs, preset)
    cell = summary["cells"]["rte/tucker"]["score"]
    assert cell["mean"] == pytest.approx(0.7) and cell["median"] == pytest.approx(0.7)
    assert cell["std"] == pytest.approx(statistics.stdev([0.6, 0.7, 0.8])) and cell["n"] == 3
    assert summary["cells"]["sst2/lora"]["wall_time_s"]["mean"] == pytest.approx(11.0)
    assert summary["overall"]["tucker"]["active_fraction_of_lora_r8"] == pytest.approx(0.6)
    assert summary["goal"] == {
        "tucker_mean_score_at_least_lora_and_adalora": True,
        "tucker_parameters_at_most_70_percent_of_lora_r8": True,
    }
    record = {"preset": "t", "model": "m", "seeds": [0, 1, 2], "notes": "", "common": {"seed": 0},
              "method_settings": {"tucker": {"tau": 0.1}}, "method_settings_source": "s",
              "environment": {"commit": "c", "date": "d"}, "summary": summary,
              "selection": {"holdout_fraction": 0.2, "seed": 0, "tasks": ["sst2"], "by_candidate": [
                  {"method": "tucker", "candidate": {"tau": 0.25}, "mean_holdout": 0.8512,
                   "active_fraction_of_lora_r8": 0.583}]}}  # fmt: skip
    table = glue_quality.markdown(record)
    assert "| rte | accuracy | tucker | dev | 70.00 +- 10.00 (70.00) | - | 600 (60%) | 11 +- 1 |" in table
    assert "| sst2 | accuracy (51.23) | lora | dev | 60.00 +- 10.00 (60.00) | - | 1,000 (100%) | 11 +- 1 |" in table
    assert "| tucker | 70.00 | 60% | - |" in table  # runs without adapter-only counts
    assert "| tucker | {'tau': 0.25} | 85.12 | 58% |" in table
    figure = glue_quality.plot_quality(summary, tmp_path / "quality.png", "t")
    assert figure.stat().st_size > 0  # one panel per task, written without a display


def test_paired_differences_against_lora_use_the_same_seeds():
    preset = {"tasks": {"sst2": {}}, "methods": ["tucker", "lora"]}
    # tucker has a seed that LoRA lacks: it is left out of the pairs
    runs = [
        fake_run("sst2", "tucker", seed, value, 700) for seed, value in ((0, 0.80), (1, 0.84), (2, 0.83), (3, 0.5))
    ]
    runs += [fake_run("sst2", "lora", seed, value, 1000) for seed, value in ((0, 0.81), (1, 0.82), (2, 0.83))]
    summary = glue_quality.aggregate(runs, preset)
    cell = summary["paired_vs_lora"]["sst2/tucker"]
    assert cell["difference"]["n"] == 3 and cell["wins"] == 2  # -0.01, +0.02, 0.00
    assert cell["difference"]["mean"] == pytest.approx(0.01 / 3)
    assert cell["difference"]["std"] == pytest.approx(statistics.stdev([-0.01, 0.02, 0.0]))
    assert cell["per_seed"] == pytest.approx({0: -0.01, 1: 0.02, 2: 0.0})
    assert "sst2/lora" not in summary["paired_vs_lora"]
    record = {"preset": "t", "model": "m", "seeds": [0, 1, 2, 3], "notes": "", "common": {}, "method_settings": {},
              "method_settings_source": "s", "environment": {"commit": "c", "date": "d"},
              "summary": summary}  # fmt: skip
    assert "| sst2 | tucker | +0.33 +- 1.53 | 2 of 3 | - | - |" in glue_quality.markdown(record)  # no per-row files


def test_paired_differences_carry_the_rows_standard_error(tmp_path: Path):
    """Runs with per-row predictions: the paired cell adds the gap's standard error over the rows (a paired
    bootstrap), which for accuracy is close to the closed form, the std of the seed-averaged per-row difference
    over sqrt(rows); with per-row scores, the ROC AUC columns too."""
    import numpy as np
    from metrics import roc_auc

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 1500)
    runs, correct, auc = [], {"tucker": [], "lora": []}, {"tucker": [], "lora": []}
    for method, rate in (("tucker", 0.85), ("lora", 0.8)):
        for seed in (0, 1):
            right = rng.random(labels.size) < rate
            correct[method].append(right)
            folder = tmp_path / method / str(seed)
            folder.mkdir(parents=True)
            (folder / "metrics.json").write_text(json.dumps({
                "task": "sst2", "method": method, "seed": seed, "eval_on": "validation",
                "main_metric": {"name": "accuracy", "split": "validation", "value": float(right.mean())},
            }))  # fmt: skip
            predictions = np.where(right, labels, 1 - labels)
            scores = (2 * predictions - 1) * rng.random(labels.size)  # signs agree with the predictions
            rows = {"validation": {"predictions": predictions.tolist(), "labels": labels.tolist(),
                                   "scores": scores.tolist()}}  # fmt: skip
            (folder / "predictions.json").write_text(json.dumps(rows))
            run = fake_run("sst2", method, seed, float(right.mean()), 700)
            auc[method].append(roc_auc(scores, labels))
            all_metrics = {"train_holdout": {"accuracy": float(right.mean()), "roc_auc": auc[method][-1]}}
            runs.append({**run, "output_dir": str(folder), "split": "train_holdout", "all_metrics": all_metrics})
    summary = glue_quality.aggregate(runs, {"tasks": {"sst2": {}}, "methods": ["tucker", "lora"]})
    per_row = np.mean([a.astype(float) - b for a, b in zip(correct["tucker"], correct["lora"])], axis=0)
    closed_form = per_row.std(ddof=1) / np.sqrt(labels.size)
    se = summary["paired_vs_lora"]["sst2/tucker"]["se_over_rows"]
    assert se == pytest.approx(closed_form, rel=0.1)
    auc_cell = summary["paired_vs_lora"]["sst2/tucker"]["roc_auc"]
    auc_gaps = [a - b for a, b in zip(auc["tucker"], auc["lora"])]
    assert auc_cell["difference"]["mean"] == pytest.approx(np.mean(auc_gaps)) and auc_cell["se_over_rows"] > 0
    assert summary["cells"]["sst2/lora"]["roc_auc"]["mean"] == pytest.approx(np.mean(auc["lora"]))
    record = {"preset": "t", "model": "m", "seeds": [0, 1], "notes": "", "common": {}, "method_settings": {},
              "method_settings_source": "s", "environment": {"commit": "c", "date": "d"},
              "summary": summary}  # fmt: skip
    table = glue_quality.markdown(record)
    # not "dev": the runs say where they scored
    assert "| sst2 | accuracy | tucker | held-out training rows |" in table
    assert f"of 2 | {100 * se:.2f} | {100 * np.mean(auc_gaps):+.2f} +- " in table  # the paired table's last columns
    assert f"| {100 * np.mean(auc['lora']):.2f} +- " in table  # the score table's ROC AUC column
    figure = glue_quality.plot_paired(summary, tmp_path / "paired.png", "t")
    assert figure.stat().st_size > 0
    assert glue_quality.plot_paired({"paired_vs_lora": {}}, tmp_path / "none.png", "t") is None


@pytest.mark.slow  # two recipe processes: about 20 s on an idle 2-core machine, much more under load
def test_one_tiny_run_end_to_end(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    preset = {
        "_notes": "tiny", "model": str(tiny_bert_dir), "data_dir": str(glue_dir), "seeds": [0, 1], "methods": ["lora"],
        "common": {"max_steps": 2, "per_device_train_batch_size": 8, "use_cpu": True, "rank": 4},
        "tasks": {"rte": {"max_seq_length": 32}},
    }  # fmt: skip
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(preset))
    results = tmp_path / "results"
    record = glue_quality.main(["--preset", str(path), "--output_dir", str(tmp_path / "runs"), "--results_dir",
                                str(results), "--timeout_s", "300"])  # fmt: skip
    assert [(r["task"], r["method"], r["seed"]) for r in record["runs"]] == [("rte", "lora", 0), ("rte", "lora", 1)]
    saved = json.loads((results / "glue_quality_preset.json").read_text())
    assert saved["summary"]["cells"]["rte/lora"]["score"]["n"] == 2
    assert (results / "glue_quality_preset.md").read_text().startswith("# GLUE quality, preset `preset`")
    assert saved["figure"] == "glue_quality_preset.png" and (results / "glue_quality_preset.png").stat().st_size > 0
    # a finished run is reused for the same options only: another rank reruns it
    first = record["runs"][0]["active_trainable_parameters"]
    path.write_text(json.dumps({**preset, "seeds": [0], "common": {**preset["common"], "rank": 2}}))
    again = glue_quality.main(["--preset", str(path), "--output_dir", str(tmp_path / "runs"), "--results_dir",
                               str(results), "--timeout_s", "300"])  # fmt: skip
    assert again["runs"][0]["active_trainable_parameters"] < first
    # --collect_only tabulates what finished; the record says "partial" only when a grid run is missing
    collect = ["--output_dir", str(tmp_path / "runs"), "--results_dir", str(results), "--collect_only"]
    path.write_text(json.dumps({**preset, "seeds": [0, 1]}))
    assert glue_quality.main(["--preset", str(path), *collect])["partial"] is False
    path.write_text(json.dumps({**preset, "seeds": [0, 1, 2]}))
    partial = glue_quality.main(["--preset", str(path), *collect])
    assert partial["partial"] is True and [r["seed"] for r in partial["runs"]] == [0, 1]
    assert "Partial results" in (results / "glue_quality_preset.md").read_text()
    # --seeds replaces the preset's seeds: the record holds those runs only, complete
    only_one = glue_quality.main(["--preset", str(path), *collect, "--seeds", "1"])
    assert only_one["seeds"] == [1] and [r["seed"] for r in only_one["runs"]] == [1] and not only_one["partial"]


def test_select_picks_per_method_tucker_within_the_parameter_budget(monkeypatch: pytest.MonkeyPatch):
    grid = {"tucker": {"tau": [0.1, 0.2, 0.3]}, "lora": {"learning_rate": [0.001, 0.003]}}
    select = {"holdout_fraction": 0.2, "max_param_fraction": 0.7, "tasks": ["sst2", "mrpc"], "grid": grid}
    preset = {"_path": "p", "seeds": [7], "tasks": {"sst2": {}, "mrpc": {}, "rte": {}}, "common": {"dropout": 0.1},
              "model": "m", "methods": ["tucker", "lora", "adalora"], "tucker": {"rank": 8, "learning_rate": 0.001},
              "lora": {"rank": 8}, "select": select}  # fmt: skip
    # Tucker: 0.1 scores best but is over budget, 0.2 is the best within it; LoRA: no budget, the best score wins
    outcome = {("tucker", 0.1): (0.90, 900), ("tucker", 0.2): (0.85, 600), ("tucker", 0.3): (0.80, 300),
               ("lora", 0.001): (0.84, 1000), ("lora", 0.003): (0.86, 1000)}  # fmt: skip
    seen = []

    def fake_run_all(jobs, desc, timeout_s, parallel):
        results = []
        for options, out, log in jobs:
            key = options["tau"] if options["method"] == "tucker" else options["learning_rate"]
            seen.append((options["method"], options["task"], key, options["holdout_fraction"], options["seed"]))
            assert options["dropout"] == 0.1 and options["rank"] == 8  # the preset's values under the candidate's
            if options["method"] == "tucker":
                assert options["learning_rate"] == 0.001
            score, active = outcome[(options["method"], key)]
            results.append({"main_metric": {"value": score}, "active_trainable_parameters": active,
                            "lora_r8_parameters": 1000})  # fmt: skip
        return results

    monkeypatch.setattr(glue_quality, "run_all", fake_run_all)
    monkeypatch.setattr(glue_quality, "resolve_model", lambda model: model)
    record = glue_quality.select_stage(preset, Path("unused"), 10.0, 1)
    assert record["chosen"] == {"tucker": {"tau": 0.2}, "lora": {"learning_rate": 0.003}}  # adalora: no grid
    expected = [("tucker", t, tau, 0.2, 7) for tau in (0.1, 0.2, 0.3) for t in ("sst2", "mrpc")]
    expected += [("lora", t, lr, 0.2, 7) for lr in (0.001, 0.003) for t in ("sst2", "mrpc")]
    assert sorted(seen) == sorted(expected)  # rte is not a selection task
    assert [c["mean_holdout"] for c in record["by_candidate"]] == pytest.approx([0.90, 0.85, 0.80, 0.84, 0.86])
    # the eval stage applies the pick on top of the preset's values
    options = glue_quality.run_options(preset, "rte", "lora", 0, record["chosen"])
    assert options["learning_rate"] == 0.003 and options["rank"] == 8 and options["task"] == "rte"


def test_seeds_option_rejects_a_repeated_seed(tmp_path: Path):
    path = tmp_path / "preset.json"
    path.write_text(json.dumps({"seeds": [0], "tasks": {"sst2": {}}, "methods": ["lora"], "common": {}}))
    with pytest.raises(ValueError, match=r"`--seeds` must not repeat a seed; got \[3, 4, 3\]"):
        glue_quality.main(["--preset", str(path), "--results_dir", str(tmp_path), "--seeds", "3", "4", "3"])


def test_select_rejects_a_grid_for_an_unknown_method():
    preset = {"_path": "p", "seeds": [0], "tasks": {"sst2": {}}, "methods": ["lora"],
              "select": {"holdout_fraction": 0.2, "grid": {"loha": {"learning_rate": [0.001]}}}}  # fmt: skip
    with pytest.raises(ValueError, match=r"`select.grid` keys must be methods among .*; got \['loha'\]"):
        glue_quality.select_stage(preset, Path("unused"), 10.0, 1)


def test_loss_curves_read_each_runs_trainer_state(tmp_path: Path):
    runs = []
    for method, family in (("lora", "lora"), ("lora_r2", "lora"), ("tucker", "tucker")):
        out = tmp_path / method
        out.mkdir()
        history = [{"step": s, "loss": 1.0 / s} for s in (10, 20, 30)] + [{"step": 30, "train_runtime": 1.0}]
        (out / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        runs.append({**fake_run("sst2", method, 0, 0.8, 500), "family": family, "output_dir": str(out)})
    runs.append({**fake_run("sst2", "adalora", 0, 0.8, 500), "output_dir": str(tmp_path / "missing")})
    path = glue_quality.plot_loss_curves(runs, tmp_path / "loss.png", "t")
    assert path == tmp_path / "loss.png" and path.stat().st_size > 0
    assert glue_quality.plot_loss_curves(runs[-1:], tmp_path / "none.png", "t") is None  # nothing logged
    # one line per method: the mean over seeds at the steps all of them logged, and their range
    band = sys.modules["glue_quality_plot"].seed_band([{10: 1.0, 20: 0.5, 30: 0.2}, {10: 0.8, 20: 0.7}])
    assert band == ([10, 20], [pytest.approx(0.9), pytest.approx(0.6)], [0.8, 0.5], [1.0, 0.7])


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks" / "configs").glob("glue_quality_*.json")), ids=str)
def test_every_preset_builds_runs_that_the_recipe_accepts(path: Path, monkeypatch, tmp_path: Path):
    """Each run of each preset, as the benchmark builds its command line, parses and passes the recipe's checks: a
    misspelt option or an inconsistent combination fails here, not an hour into a benchmark."""
    from finetune import check_args, parse_args

    monkeypatch.setattr(glue_quality, "resolve_model", lambda model: "unused-model")
    preset = glue_quality.load_preset(str(path))
    for task in preset["tasks"]:
        for method in preset["methods"]:
            options = glue_quality.run_options(preset, task, method, preset["seeds"][0])
            argv = glue_quality.to_argv(options) + ["--output_dir", str(tmp_path / "run")]
            _, data_args, adapter_args, training_args = parse_args(argv)
            check_args(data_args, adapter_args, training_args)
            assert adapter_args.method == preset.get("variants", {}).get(method, {}).get("method", method)
            assert data_args.task == task
