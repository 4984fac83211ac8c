"""`benchmarks/dreambooth_quality.py` end to end on the tiny test base, one short setting, with the image metrics."""

from __future__ import annotations

import json
import sys

import torch
from dreambooth_fixtures import REPO

from tests.tolerances import TOLERANCES


def test_benchmark_writes_the_table_with_image_metrics(tiny_base, instance_dir, tiny_clip, tiny_dino, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import dreambooth_quality

    out = tmp_path / "bench"
    dreambooth_quality.main([
        "--base", str(tiny_base), "--instance_data_dir", str(instance_dir), "--heldout_image", "02.jpg",
        "--seeds", "0", "--taus", "0.3", "--max_train_steps", "2", "--only", "tucker tau=0.3 attn",
        "--output_dir", str(out), "--clip_model_name_or_path", str(tiny_clip),
        "--dino_model_name_or_path", str(tiny_dino), "--num_validation_images", "1",
    ])  # fmt: skip
    report = json.loads((out / "dreambooth_quality.json").read_text())
    [row] = report["table"]
    assert row["setting"] == "tucker tau=0.3 attn" and row["seeds"] == 1
    for name in ("clip_i", "clip_t", "dino"):
        assert -1 <= row[name] <= 1 and row[name] == report["runs"][0][name], name
    table = (out / "dreambooth_quality.md").read_text()
    assert "| CLIP-I | CLIP-T | DINO |" in table
    assert (out / "dreambooth_quality.png").is_file()


def test_two_jobs_match_one_and_finished_runs_are_reused(tiny_base, instance_dir, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import dreambooth_quality

    def run(out, *extra):
        dreambooth_quality.main([
            "--base", str(tiny_base), "--instance_data_dir", str(instance_dir), "--heldout_image", "02.jpg",
            "--seeds", "0", "1", "--taus", "0.3", "--max_train_steps", "2", "--only", "tucker tau=0.3 attn",
            "--output_dir", str(out), *extra,
        ])  # fmt: skip
        return json.loads((out / "dreambooth_quality.json").read_text())["runs"]

    sequential, parallel = run(tmp_path / "one"), run(tmp_path / "two", "--jobs", "2")
    # every training seed is scored on the same held-out draws: one base loss, and the gain is paired
    seed0, seed1 = sequential
    assert seed0["heldout_loss_base"] == seed1["heldout_loss_base"]
    assert seed0["heldout_loss"] != seed1["heldout_loss"]
    [row] = json.loads((tmp_path / "one" / "dreambooth_quality.json").read_text())["table"]
    gains = [r["heldout_loss_base"] - r["heldout_loss"] for r in sequential]
    assert abs(row["heldout_gain"] - sum(gains) / 2) <= 1e-12 and row["heldout_gain_sd"] > 0
    for a, b in zip(sequential, parallel, strict=True):
        assert a["seed"] == b["seed"] and a["active_params"] == b["active_params"]
        # the same training in another process, with another thread count: float32 sums may round differently
        assert abs(a["heldout_loss"] - b["heldout_loss"]) <= TOLERANCES[torch.float32]["rtol"] * a["heldout_loss"]

    metrics = tmp_path / "one" / "runs" / "tucker_tau0.3_attn-seed1" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    assert run(tmp_path / "one") == sequential  # both runs reused: nothing retrained
    assert metrics.stat().st_mtime_ns == stamp
    rerun = run(tmp_path / "one", "--max_train_steps", "3")  # other arguments: trained again
    assert metrics.stat().st_mtime_ns != stamp and rerun != sequential
