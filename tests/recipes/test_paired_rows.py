"""The paired comparison of two methods on the same rows (`benchmarks/paired_rows.py`), on run folders written here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from glue_fixtures import REPO

spec = importlib.util.spec_from_file_location("paired_rows", REPO / "benchmarks" / "paired_rows.py")
paired_rows = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paired_rows)


def write_run(folder: Path, method: str, seed: int, predictions, labels, task: str = "sst2", scores=None) -> Path:
    """A run folder as the GLUE recipe writes it, reduced to what the comparison reads."""
    folder.mkdir(parents=True)
    metric = "pearson" if task == "stsb" else "accuracy"
    metrics = {"task": task, "method": method, "seed": seed, "eval_on": "train_holdout",
               "main_metric": {"name": metric, "split": "train_holdout", "value": None}}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))
    rows = {"predictions": list(predictions), "labels": list(labels)}
    if scores is not None:
        rows["scores"] = list(scores)
    (folder / "predictions.json").write_text(json.dumps({"train_holdout": rows, "validation": rows}))
    return folder


def test_gaps_per_seed_and_over_rows(tmp_path: Path):
    """Hand-made correctness: the per-seed scores and gaps are exact, and for accuracy the bootstrap's standard
    error matches the closed form, the std of the seed-averaged per-row difference over sqrt(rows)."""
    rng = np.random.default_rng(0)
    rows = 3000
    labels = rng.integers(0, 2, rows)
    correct_a, correct_b = [], []
    for seed in (1, 2, 3):
        a = rng.random(rows) < 0.82
        b = np.where(rng.random(rows) < 0.9, a, rng.random(rows) < 0.8)  # mostly the same rows right, as in practice
        correct_a.append(a)
        correct_b.append(b)
        write_run(tmp_path / f"t{seed}", "tucker", seed, np.where(a, labels, 1 - labels).tolist(), labels.tolist())
        write_run(tmp_path / f"l{seed}", "lora", seed, np.where(b, labels, 1 - labels).tolist(), labels.tolist())
    report = paired_rows.main(["--runs", str(tmp_path / "t*"), "--against", str(tmp_path / "l*"), "--output",
                               str(tmp_path / "out" / "report.json")])  # fmt: skip
    result = report["result"]
    gaps = [a.mean() - b.mean() for a, b in zip(correct_a, correct_b)]
    assert [p["seed"] for p in result["per_seed"]] == [1, 2, 3]
    assert [p["gap"] for p in result["per_seed"]] == pytest.approx(gaps, abs=1e-12)
    assert result["gap_mean"] == pytest.approx(np.mean(gaps), abs=1e-12)
    assert result["seeds_at_or_above"] == sum(g >= 0 for g in gaps)
    assert result["per_seed"][0]["disagreement"] == pytest.approx(np.mean(correct_a[0] != correct_b[0]))
    per_row = np.mean([a.astype(float) - b for a, b in zip(correct_a, correct_b)], axis=0)
    closed_form = per_row.std(ddof=1) / np.sqrt(rows)
    # 2,000 resamples estimate a standard error to about 1.6% (1 / sqrt(2 * 2000)); 10% leaves room for no more
    assert result["gap_se_over_rows"] == pytest.approx(closed_form, rel=0.1)
    low, high = result["gap_95_interval_over_rows"]
    assert low < result["gap_mean"] < high
    assert high - low == pytest.approx(2 * 1.96 * closed_form, rel=0.15)
    table = (tmp_path / "out" / "report.md").read_text()
    assert "tucker against lora on `train_holdout` (3,000 rows)" in table and "| 2 |" in table
    assert json.loads((tmp_path / "out" / "report.json").read_text())["result"]["rows"] == rows


def test_regression_runs_compare_their_correlation(tmp_path: Path):
    labels = np.linspace(0, 5, 50)
    write_run(tmp_path / "a", "tucker", 0, (labels + np.sin(7 * labels)).tolist(), labels.tolist(), task="stsb")
    write_run(tmp_path / "b", "lora", 0, (labels + 3 * np.sin(7 * labels)).tolist(), labels.tolist(), task="stsb")
    pairs = paired_rows.pair_by_seed(paired_rows.expand([str(tmp_path / "a")], "--runs"),
                                     paired_rows.expand([str(tmp_path / "b")], "--against"))  # fmt: skip
    result = paired_rows.compare(pairs, "validation", resamples=50)
    pearson = [np.corrcoef(labels + k * np.sin(7 * labels), labels)[0, 1] for k in (1, 3)]
    expected = pearson[0] - pearson[1]
    assert result["metric"] == "pearson" and result["gap_mean"] == pytest.approx(expected, abs=1e-9)
    assert result["per_seed"][0]["disagreement"] is None and result["gap_se_over_rows"] > 0


def test_bad_input_is_named(tmp_path: Path):
    write_run(tmp_path / "t0", "tucker", 0, [1, 0, 0], [1, 1, 1])
    write_run(tmp_path / "l0", "lora", 0, [1, 1, 0], [1, 1, 1])
    write_run(tmp_path / "l1", "lora", 1, [1, 1, 0], [1, 1, 1])
    write_run(tmp_path / "other_rows", "lora", 0, [1, 1, 0, 0], [1, 1, 1, 0])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text("{}")

    def run(*args: str):
        return paired_rows.main(["--resamples", "10", *args])

    with pytest.raises(FileNotFoundError, match=r"folder .*old has no predictions.json \(runs of the recipe before"):
        run("--runs", str(tmp_path / "old"), "--against", str(tmp_path / "l0"))
    with pytest.raises(ValueError, match=r"`--runs` and `--against` must have the same seeds; got \[0\] and \[0, 1\]"):
        run("--runs", str(tmp_path / "t0"), "--against", str(tmp_path / "l*"))
    with pytest.raises(ValueError, match=r"`--against` must hold one run per seed; got seeds \[0, 0\]"):
        run("--runs", str(tmp_path / "t0"), "--against", str(tmp_path / "l0"), str(tmp_path / "other_rows"))
    with pytest.raises(ValueError, match=r"labels of 'train_holdout' differ between .*t0 and .*other_rows \(3 and 4"):
        run("--runs", str(tmp_path / "t0"), "--against", str(tmp_path / "other_rows"))
    with pytest.raises(ValueError, match=r"`--split` 'test' is not in .*t0; it has \['train_holdout', 'validation'\]"):
        run("--runs", str(tmp_path / "t0"), "--against", str(tmp_path / "l0"), "--split", "test")
    with pytest.raises(ValueError, match=r"`--label` and `--against_label` must differ .*; both are 'lora'"):
        run("--runs", str(tmp_path / "l0"), "--against", str(tmp_path / "l0"))
    with pytest.raises(ValueError, match=r"`--resamples` must be >= 2; got 1"):
        run("--runs", str(tmp_path / "t0"), "--against", str(tmp_path / "l0"), "--resamples", "1")
    report = run("--runs", str(tmp_path / "t0"), "--against", str(tmp_path / "l0"), "--split", "validation")
    assert report["result"]["per_seed"][0]["gap"] == pytest.approx(-1 / 3)


def test_roc_auc_compares_the_rows_scores(tmp_path: Path):
    """`--metric roc_auc` ranks the rows' scores (the per-seed values equal the pairwise definition), while
    "rows predicted differently" still counts the class predictions."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    expected = []
    for seed in (1, 2):
        sharp, blunt = labels + rng.normal(size=400), labels + 2 * rng.normal(size=400)
        for name, method, scores in (("t", "tucker", sharp), ("l", "lora", blunt)):
            write_run(tmp_path / f"{name}{seed}", method, seed, (scores > 0.5).astype(int).tolist(), labels.tolist(),
                      scores=scores.round(5).tolist())  # fmt: skip

        def by_pairs(s):
            pos, neg = s[labels == 1], s[labels == 0]
            return np.mean(pos[:, None] > neg[None, :])

        expected.append(by_pairs(sharp.round(5)) - by_pairs(blunt.round(5)))
    report = paired_rows.main(["--runs", str(tmp_path / "t*"), "--against", str(tmp_path / "l*"), "--metric",
                               "roc_auc", "--resamples", "200"])  # fmt: skip
    result = report["result"]
    assert result["metric"] == "roc_auc"
    assert [p["gap"] for p in result["per_seed"]] == pytest.approx(expected, abs=1e-12)
    assert result["gap_mean"] > 0 and result["gap_se_over_rows"] > 0
    assert 0 < result["per_seed"][0]["disagreement"] < 1


def test_bad_metric_and_missing_scores_are_named(tmp_path: Path):
    write_run(tmp_path / "t0", "tucker", 0, [1, 0, 0], [1, 0, 1])
    write_run(tmp_path / "l0", "lora", 0, [1, 1, 0], [1, 0, 1], scores=[0.3, 0.2, -0.1])
    args = ["--runs", str(tmp_path / "t0"), "--against", str(tmp_path / "l0"), "--resamples", "10", "--metric"]
    with pytest.raises(ValueError, match=r"`--metric` must be one of sst2's \['accuracy', 'roc_auc'\]; got 'f1'"):
        paired_rows.main([*args, "f1"])
    with pytest.raises(ValueError, match=r"t0 has no per-row scores for 'train_holdout' \(the recipe writes scores"):
        paired_rows.main([*args, "roc_auc"])
