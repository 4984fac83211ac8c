"""The GLUE quality benchmark runner: presets, aggregation over seeds, the table, and one tiny real run."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
from glue_fixtures import REPO

spec = importlib.util.spec_from_file_location("glue_quality", REPO / "benchmarks" / "glue_quality.py")
glue_quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(glue_quality)


def fake_run(task: str, method: str, seed: int, value: float, active: int) -> dict:
    return {"task": task, "method": method, "seed": seed, "metric": "accuracy", "value": value,
            "active_trainable_parameters": active, "lora_r8_parameters": 1000, "wall_time_s": 10.0 + seed}  # fmt: skip


def test_presets_load_and_cover_the_four_local_tasks():
    for name in ("quick", "full"):
        preset = glue_quality.load_preset(name)
        assert sorted(preset["tasks"]) == ["cola", "mrpc", "rte", "sst2"]
        assert len(preset["seeds"]) >= 3 and preset["methods"] == ["tucker", "lora", "adalora"]
        assert preset["tasks"]["sst2"]["max_train_samples"] < 67349  # a documented SST-2 subset
    with pytest.raises(ValueError, match=r"`--preset` must be one of \['full', 'quick'\] or a JSON file; got 'fast'"):
        glue_quality.load_preset("fast")


def test_aggregate_means_stds_and_goal():
    preset = {"tasks": {"rte": {}, "sst2": {}}, "methods": ["tucker", "lora", "adalora"]}
    runs = []
    for seed, (t, lo, ada) in enumerate([(0.6, 0.5, 0.55), (0.7, 0.6, 0.55), (0.8, 0.7, 0.55)]):
        for task in ("rte", "sst2"):
            runs += [fake_run(task, "tucker", seed, t, 600), fake_run(task, "lora", seed, lo, 1000),
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
    record = {"preset": "t", "model": "m", "seeds": [0, 1, 2], "notes": "", "tucker_settings": {"tau": 0.1},
              "tucker_settings_source": "s", "environment": {"commit": "c", "date": "d"},
              "summary": summary}  # fmt: skip
    table = glue_quality.markdown(record)
    assert "| rte | accuracy | tucker | 70.00 +- 10.00 (70.00) | 600 (60%) | 11 +- 1 |" in table


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


def test_select_prefers_the_best_candidate_within_the_parameter_budget(monkeypatch: pytest.MonkeyPatch):
    select = {"holdout_fraction": 0.2, "max_param_fraction": 0.7, "grid": {"tau": [0.1, 0.2, 0.3]}}
    preset = {"_path": "p", "seeds": [7], "tasks": {"sst2": {}, "mrpc": {}}, "common": {}, "model": "m",
              "tucker": {"rank": 8}, "select": select}  # fmt: skip
    # held-out score and parameter share per tau: 0.1 scores best but is over budget; 0.2 is the best within it
    outcome = {0.1: (0.90, 900), 0.2: (0.85, 600), 0.3: (0.80, 300)}
    seen = []

    def fake_run_all(jobs, desc, timeout_s, parallel):
        results = []
        for options, out, log in jobs:
            seen.append((options["task"], options["tau"], options["holdout_fraction"], options["seed"]))
            score, active = outcome[options["tau"]]
            results.append({"main_metric": {"value": score}, "active_trainable_parameters": active,
                            "lora_r8_parameters": 1000})  # fmt: skip
        return results

    monkeypatch.setattr(glue_quality, "run_all", fake_run_all)
    monkeypatch.setattr(glue_quality, "resolve_model", lambda model: model)
    record = glue_quality.select_stage(preset, Path("unused"), 10.0, 1)
    assert record["chosen"] == {"tau": 0.2}
    assert sorted(seen) == sorted((t, tau, 0.2, 7) for t in ("sst2", "mrpc") for tau in (0.1, 0.2, 0.3))
    assert [c["mean_holdout"] for c in record["by_candidate"]] == pytest.approx([0.90, 0.85, 0.80])
