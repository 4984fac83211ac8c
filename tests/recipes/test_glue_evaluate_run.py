"""evaluate_run.py: a finished run's saved adapter scored on dev, without training again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from evaluate_run import main as evaluate
from finetune import main as finetune
from test_glue_finetune import base_args, needs_tucker


def saved_rows(folder: Path, split: str) -> dict:
    return json.loads((folder / "predictions.json").read_text())[split]


@needs_tucker
def test_a_held_out_run_scored_on_dev_equals_the_same_run_trained_for_dev(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
):
    """--holdout_rows only changes the rows a run is scored on: its adapter, scored on dev afterwards, gives the
    dev predictions, scores and metrics of the same command run without it."""
    subset = ["--max_train_samples", "20", "--train_subset_seed", "3"]
    on_dev = finetune(base_args(tiny_bert_dir, glue_dir, tmp_path / "dev", "sst2", "tucker", 4) + subset)
    held_out = tmp_path / "held_out"
    finetune(base_args(tiny_bert_dir, glue_dir, held_out, "sst2", "tucker", 4) + subset + ["--holdout_rows", "8"])
    assert "validation" not in json.loads((held_out / "predictions.json").read_text())

    report = evaluate([str(held_out), "--output_dir", str(tmp_path / "scored")])
    mine, reference = saved_rows(tmp_path / "scored", "validation"), saved_rows(tmp_path / "dev", "validation")
    assert mine["labels"] == reference["labels"] and mine["predictions"] == reference["predictions"]
    np.testing.assert_allclose(mine["scores"], reference["scores"], rtol=1e-4, atol=1e-5)  # 6 digits kept
    assert report["eval_on"] == "validation" and report["main_metric"] == on_dev["main_metric"]
    assert report["metrics"]["validation"]["roc_auc"] == pytest.approx(on_dev["metrics"]["validation"]["roc_auc"])
    assert report["evaluated_from"] == str(held_out.resolve()) and report["seed"] == on_dev["seed"]
    # the run's own record is untouched: it still holds the held-out rows only
    assert json.loads((held_out / "metrics.json").read_text())["eval_on"] == "train_holdout"


def test_bad_input_is_named(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"`run` must be a finished finetune.py output folder.*metrics.json"):
        evaluate([str(tmp_path), "--output_dir", str(tmp_path / "out")])
    run = tmp_path / "run"
    finetune(base_args(tiny_bert_dir, glue_dir, run, "sst2", "lora", 2))
    with pytest.raises(ValueError, match=r"`--output_dir` must not be the run's own folder"):
        evaluate([str(run), "--output_dir", str(run)])
    with pytest.raises(
        ValueError, match=r"`--split` must name dev splits of sst2 \(\['validation'\]\); got \['test'\]"
    ):
        evaluate([str(run), "--output_dir", str(tmp_path / "out"), "--split", "test"])
    with pytest.raises(ValueError, match=r"`--batch_size` must be a positive integer; got 0"):
        evaluate([str(run), "--output_dir", str(tmp_path / "out"), "--batch_size", "0"])
