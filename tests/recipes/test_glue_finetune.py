"""The fine-tuning script end to end on a tiny BERT: tucker, lora and adalora, argument handling, saved adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from finetune import config_to_argv, lora_parameters, main, parse_args
from glue_fixtures import REPO, WORDS, write_tsv
from metrics import roc_auc

CONFIGS = REPO / "recipes" / "glue" / "configs"


def tucker_available() -> bool:
    try:
        from tucker_lora import TuckerRankCallback  # noqa: F401
    except ImportError:
        return False
    return True


needs_tucker = pytest.mark.skipif(not tucker_available(), reason="tucker_lora.TuckerRankCallback is not importable")


def base_args(model_dir: Path, data_dir: Path, out: Path, task: str, method: str, steps: int) -> list[str]:
    return [
        "--task", task, "--method", method, "--model_name_or_path", str(model_dir), "--data_dir", str(data_dir),
        "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "8",
        "--learning_rate", "5e-3", "--use_cpu", "true", "--seed", "0", "--logging_steps", "2",
        "--disable_tqdm", "true",
    ]  # fmt: skip


def reload_logits(out: Path, model_dir: Path, num_labels: int, batch: dict) -> torch.Tensor:
    """Logits of the saved adapter put back on a fresh copy of the base model."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        return model(**batch).logits


def tiny_batch(model_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer(
        ["the film was good", "a bad movie ?"], ["he said it", "she ran"], return_tensors="pt", padding=True
    )


def test_config_flattens_common_then_method_section(tmp_path: Path):
    path = tmp_path / "c.json"
    config = {"_command": "ignored", "common": {"task": "rte", "use_cpu": True, "learning_rate": 1e-3},
              "lora": {"rank": 4, "target_modules": ["query", "value"]}, "tucker": {"tau": 0.2}}  # fmt: skip
    path.write_text(json.dumps(config))
    assert config_to_argv(str(path), "lora") == [
        "--task", "rte", "--use_cpu", "true", "--learning_rate", "0.001", "--rank", "4", "--target_modules", "query",
        "value",
    ]  # fmt: skip
    config["extra"] = {}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"`--config` sections must be among .*; got \['extra'\]"):
        config_to_argv(str(path), "lora")


def test_command_line_overrides_config(tmp_path: Path):
    _, data, adapter, training = parse_args(
        [
            "--config",
            str(CONFIGS / "rte.json"),
            "--method",
            "lora",
            "--learning_rate",
            "0.5",
            "--output_dir",
            str(tmp_path),
        ]  # fmt: skip
    )
    assert (data.task, data.max_seq_length, adapter.rank, training.learning_rate) == ("rte", 320, 8, 0.5)
    assert (training.num_train_epochs, training.report_to, training.save_strategy) == (80, [], "no")
    _, _, adapter, _ = parse_args(["--config", str(CONFIGS / "rte.json"), "--output_dir", str(tmp_path)])
    tucker = (adapter.method, adapter.rank, adapter.r_max, adapter.tau, adapter.core_steps)
    assert tucker == ("tucker", 10, 32, 0.15, 10)


@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"])
def test_every_task_config_parses(task: str, tmp_path: Path):
    for method in ("tucker", "lora", "adalora"):
        _, data, adapter, _ = parse_args(["--config", str(CONFIGS / f"{task}.json"), "--method", method,
                                          "--output_dir", str(tmp_path)])  # fmt: skip
        assert data.task == task and adapter.method == method
    command = json.loads((CONFIGS / f"{task}.json").read_text())["_command"][0]
    assert command.startswith(f"python recipes/glue/finetune.py --config recipes/glue/configs/{task}.json")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--task", "sst-2", r"`--task` must be one of \[.*\]; got 'sst-2'"),
        ("--method", "dora", r"`--method` must be one of \['tucker', 'lora', 'adalora'\]; got 'dora'"),
        ("--holdout_fraction", "1.5", r"`--holdout_fraction` must be in \[0, 1\); got 1.5"),
        ("--holdout_rows", "0", r"`--holdout_rows` must be a positive integer; got 0"),
        ("--holdout_rows", "8", r"`--holdout_rows` takes rows outside the --max_train_samples subset"),
        ("--holdout_min_words", "-1", r"`--holdout_min_words` must be >= 0; got -1"),
        ("--holdout_whole_sentences", "true", r"`--holdout_whole_sentences` chooses among the `--holdout_rows`"),
        ("--core_lr_ratio", "0", r"`--core_lr_ratio` must be a finite number > 0; got 0.0"),
    ],
)
def test_bad_arguments_fail_early(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, flag, value, message):
    args = base_args(tiny_bert_dir, glue_dir, tmp_path, "rte", "lora", 2) + [flag, value]
    with pytest.raises(ValueError, match=message):
        main(args)


def test_adalora_target_must_be_below_init_rank(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    args = base_args(tiny_bert_dir, glue_dir, tmp_path, "rte", "adalora", 20)
    args += ["--rank", "4", "--adalora_target_r", "8"]
    with pytest.raises(ValueError, match=r"`--adalora_target_r` must be below `--rank`.*; got 8 >= 4"):
        main(args)


def test_default_ranks_run_for_every_method(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    for method, rank in (("tucker", 8), ("lora", 8), ("adalora", 12)):
        _, _, adapter_args, _ = parse_args(base_args(tiny_bert_dir, glue_dir, tmp_path, "mrpc", method, 20))
        assert adapter_args.rank == rank and adapter_args.adalora_target_r == 8
    # AdaLoRA with the script's own defaults (no --rank, no config) trains and allocates
    out = tmp_path / "adalora-defaults"
    main(base_args(tiny_bert_dir, glue_dir, out, "mrpc", "adalora", 20) + ["--adalora_delta_t", "2"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["method"] == "adalora" and saved["optimizer_steps"] == 20
    assert sum(saved["final_ranks"].values()) == 8 * len(saved["final_ranks"])


def test_lora_on_mrpc(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    out = tmp_path / "lora"
    report = main(base_args(tiny_bert_dir, glue_dir, out, "mrpc", "lora", 6) + ["--rank", "8"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["optimizer_steps"] == 6 and saved["method"] == "lora"
    assert set(saved["metrics"]["validation"]) == {"accuracy", "f1", "roc_auc"}  # ROC AUC: two classes
    assert 0.0 <= saved["main_metric"]["value"] <= 1.0
    # true count == r * (in + out) per adapted layer + head: 12 layers of a 2-layer BERT with hidden 32, FFN 64
    per_layer = 8 * (3 * (32 + 32) + (32 + 32) + (32 + 64) + (64 + 32))
    head = 32 * 2 + 2
    assert saved["trainable_parameters"] == saved["active_trainable_parameters"] == 2 * per_layer + head
    assert saved["lora_r8_parameters"] == 2 * per_layer + head
    assert set(saved["final_ranks"].values()) == {8} and len(saved["final_ranks"]) == 12
    assert saved["versions"]["peft"] and saved["wall_time_s"] > 0 and saved["rank_plot"] is None
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert report["metrics"] == saved["metrics"]


def test_adalora_on_stsb_allocates_ranks(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    out = tmp_path / "adalora"
    args = base_args(tiny_bert_dir, glue_dir, out, "stsb", "adalora", 20)
    main(args + ["--rank", "6", "--adalora_target_r", "2", "--adalora_delta_t", "2"])
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["metrics"]["validation"]) == {"pearson", "spearman"}
    ranks = saved["final_ranks"]
    # the allocator ran: the budget ends at target_r per layer on average, below init_r's 6 * 12
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1
    assert saved["active_trainable_parameters"] < saved["trainable_parameters"]
    assert Path(saved["rank_plot"]).is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("adalora_total_rank" in entry for entry in state["log_history"])


def test_saved_adapter_restores_head_and_weights(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    out = tmp_path / "reload"
    main(base_args(tiny_bert_dir, glue_dir, out, "rte", "lora", 4) + ["--rank", "4"])
    batch = tiny_batch(tiny_bert_dir)
    first = reload_logits(out, tiny_bert_dir, 2, batch)
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(123)  # a different random head on the fresh base: the saved one must replace it
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()
    with torch.no_grad():
        untouched = base(**batch).logits
    assert not torch.allclose(first, untouched)
    assert torch.allclose(first, reload_logits(out, tiny_bert_dir, 2, batch))


def test_holdout_evaluates_on_train_part(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    out = tmp_path / "holdout"
    saved = main(base_args(tiny_bert_dir, glue_dir, out, "sst2", "lora", 2) + ["--holdout_fraction", "0.25"])
    assert saved["num_train_samples"] == 24 and saved["num_eval_samples"] == {"train_holdout": 8}
    assert saved["main_metric"]["split"] == "train_holdout"
    # each row's prediction and label, in row order: the saved score is theirs
    rows = json.loads((out / "predictions.json").read_text())["train_holdout"]
    assert len(rows["predictions"]) == len(rows["labels"]) == 8
    accuracy = np.mean(np.array(rows["predictions"]) == np.array(rows["labels"]))
    assert saved["main_metric"]["value"] == pytest.approx(accuracy)
    # a two-class task: each row's score is its logit margin (positive where class 1 is predicted), and ROC AUC of
    # those scores sits beside the task's metrics
    scores = np.array(rows["scores"])
    assert scores.shape == (8,) and ((scores > 0) == (np.array(rows["predictions"]) == 1)).all()
    assert saved["metrics"]["train_holdout"]["roc_auc"] == pytest.approx(roc_auc(scores, np.array(rows["labels"])))
    assert any("train_holdout_accuracy" in entry for entry in saved_history(out))  # still logged as evaluate did


def test_predictions_follow_the_rows_order_under_length_grouping(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    """Trainer evaluates in a seeded, length-grouped order when training groups by length; predictions.json must
    still list the rows in their order, so that runs of other seeds and methods pair row by row."""
    from tasks import load_glue

    extra = ["--train_sampling_strategy", "group_by_length", "--per_device_eval_batch_size", "4"]
    main(base_args(tiny_bert_dir, glue_dir, tmp_path / "grouped", "sst2", "lora", 2) + extra)
    saved = json.loads((tmp_path / "grouped" / "predictions.json").read_text())["validation"]
    assert saved["labels"] == list(load_glue("sst2", glue_dir)["validation"]["label"])


def saved_history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def test_holdout_rows_come_from_outside_the_training_subset(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    from tasks import held_out_rows, load_glue, take_rest, take_subset

    raw = load_glue("sst2", glue_dir)["train"]
    raw = raw.add_column("row", list(range(len(raw))))
    subset, rest = take_subset(raw, 20, 42), take_rest(raw, 20, 42)
    long_rows = held_out_rows(rest, 3, min_words=4)
    assert len(subset) + len(rest) == len(raw)
    assert not set(subset["row"]) & set(rest["row"]) and set(long_rows["row"]) <= set(rest["row"])
    assert all(len(text.split()) >= 4 for text in long_rows["sentence1"])
    with pytest.raises(ValueError, match=r"asks for 13 rows .* only 12 exist"):
        held_out_rows(rest, 13)
    extra = ["--max_train_samples", "20", "--holdout_rows", "8"]
    saved = main(base_args(tiny_bert_dir, glue_dir, tmp_path / "rest", "sst2", "lora", 2) + extra)
    assert saved["num_train_samples"] == 20 and saved["num_eval_samples"] == {"train_holdout": 8}


def test_holdout_rows_share_no_phrase_with_the_training_rows():
    import datasets
    from tasks import held_out_rows

    train = datasets.Dataset.from_dict({"sentence1": ["a fine film", "The plot is thin and dull",
                                                      "one of the best films of the year"]})  # fmt: skip
    rest = datasets.Dataset.from_dict({"sentence1": [
        "the plot is thin and dull , but the cast shines",  # holds a training row of >= 4 words
        "best films of the year",  # lies inside a training row
        "a fine film indeed",  # holds a training row of 3 words only: kept
        "a wholly new sentence here",
    ]})  # fmt: skip
    kept = held_out_rows(rest, 2, disjoint_from=train)
    assert kept["sentence1"] == ["a fine film indeed", "a wholly new sentence here"]
    assert held_out_rows(rest, 3)["sentence1"] == rest["sentence1"][:3]  # without it, the first rows
    with pytest.raises(ValueError, match=r"asks for 3 rows .* sharing no phrase with it; only 2 exist"):
        held_out_rows(rest, 3, disjoint_from=train)
    # spans shorter than min_words are not kept, and rows that short are filtered out before the test
    assert held_out_rows(rest, 1, min_words=5, disjoint_from=train)["sentence1"] == ["a wholly new sentence here"]


def test_holdout_whole_sentences_lie_inside_no_longer_training_row():
    import datasets
    from tasks import held_out_rows

    everything = datasets.Dataset.from_dict({"sentence1": [
        "the cast shines in a film that drags",
        "a film that drags",  # a phrase of the row above
        "The Cast Shines",  # also inside it (case-insensitive, whole words)
        "a quiet and moving portrait of grief",
        "shines in",
    ]})  # fmt: skip
    rest = everything.select([1, 2, 3, 4])
    kept = held_out_rows(rest, 1, whole_sentences_of=everything)
    assert kept["sentence1"] == ["a quiet and moving portrait of grief"]
    whole = r", whole sentences \(inside no longer training row\); only"
    with pytest.raises(ValueError, match=r"asks for 2 rows .*" + whole + " 1 exist"):
        held_out_rows(rest, 2, whole_sentences_of=everything)
    # "shines in" lies inside the first row as a span of 2 words: with min_words 2 it is still found and left out
    with pytest.raises(ValueError, match=r"asks for 1 rows .*" + whole + " 0 exist"):
        held_out_rows(everything.select([4]), 1, min_words=2, whole_sentences_of=everything)


def test_holdout_fraction_leaves_out_rows_that_share_a_phrase_with_the_training_part(
    tiny_bert_dir: Path, tmp_path: Path
):
    import random

    from tasks import load_glue, shares_text_with

    rng = random.Random(0)
    phrases = [" ".join(rng.choice(WORDS[:-6]) for _ in range(5)) for _ in range(8)]
    rows = [[p, "0"] for p in phrases] + [[p + " good film", "1"] for p in phrases]  # each phrase in a longer row
    write_tsv(tmp_path / "glue" / "SST-2" / "train.tsv", [["sentence", "label"]] + rows)
    write_tsv(tmp_path / "glue" / "SST-2" / "dev.tsv", [["sentence", "label"]] + rows[:4])
    split = load_glue("sst2", tmp_path / "glue")["train"].train_test_split(test_size=0.5, seed=42)
    shares = shares_text_with(split["train"]["sentence1"])
    expected = sum(not shares(text) for text in split["test"]["sentence1"])
    assert 0 < expected < 8  # the split puts some pairs on both sides
    counts = {}
    for disjoint in ("true", "false"):
        extra = ["--holdout_fraction", "0.5", "--holdout_disjoint", disjoint]
        saved = main(base_args(tiny_bert_dir, tmp_path / "glue", tmp_path / disjoint, "sst2", "lora", 1) + extra)
        counts[disjoint] = saved["num_eval_samples"]["train_holdout"]
    assert counts == {"true": expected, "false": 8}


@needs_tucker
def test_core_lr_ratio_gives_the_cores_a_group_of_their_own(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    import finetune

    seen = {}
    original = finetune.GlueTrainer.create_optimizer

    def spy(self, model=None):
        optimizer = original(self, model)
        names = {id(p): n for n, p in self.model.named_parameters()}
        seen.update({names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]})
        return optimizer

    finetune.GlueTrainer.create_optimizer = spy
    try:
        main(base_args(tiny_bert_dir, glue_dir, tmp_path / "ratio", "sst2", "tucker", 2) + ["--core_lr_ratio", "4"])
    finally:
        finetune.GlueTrainer.create_optimizer = original
    cores = [lr for n, lr in seen.items() if ".tucker_core." in n]
    others = [lr for n, lr in seen.items() if ".tucker_core." not in n]
    assert cores and others
    assert cores == pytest.approx([2e-2] * len(cores)) and others == pytest.approx([5e-3] * len(others))


@needs_tucker
def test_in_basis_lr_ratio_reaches_the_saved_adapter_and_needs_absorb_core(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
):
    out = tmp_path / "ratio"
    args = base_args(tiny_bert_dir, glue_dir, out, "sst2", "tucker", 2) + ["--in_basis_lr_ratio", "1.5"]
    main(args + ["--absorb_core", "true"])
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["absorb_core"] is True and saved["in_basis_lr_ratio"] == 1.5
    with pytest.raises(ValueError, match=r"`in_basis_lr_ratio` applies to folded adapters only"):
        main(
            base_args(tiny_bert_dir, glue_dir, tmp_path / "unfolded", "sst2", "tucker", 2)
            + ["--in_basis_lr_ratio", "1.5"]
        )


@needs_tucker
def test_tucker_on_mnli(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    out = tmp_path / "tucker"
    args = base_args(tiny_bert_dir, glue_dir, out, "mnli", "tucker", 12)
    main(args + ["--rank", "4", "--r_max", "8", "--core_steps", "2", "--augment_start_step", "2", "--tau", "0.1"])
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["metrics"]) == {"validation_matched", "validation_mismatched"}
    assert len(saved["final_ranks"]) == 12
    assert all(1 <= r <= 8 for ranks in saved["final_ranks"].values() for r in ranks)
    assert 0 < saved["active_trainable_parameters"] <= saved["trainable_parameters"]
    assert Path(saved["rank_plot"]).is_file()
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import tucker_lora  # registers the TUCKER type for loading

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    reloaded = PeftModel.from_pretrained(base, out / "adapter")
    assert {name: list(r) for name, r in tucker_lora.get_ranks(reloaded).items()} == saved["final_ranks"]
    logits = reload_logits(out, tiny_bert_dir, 3, tiny_batch(tiny_bert_dir))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_reference_lora_count_matches_a_real_lora(tiny_bert_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value", "output.dense"],
                        modules_to_save=["classifier"])  # fmt: skip
    model = get_peft_model(base, config)
    true_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_parameters(model, 4) == true_count


@needs_tucker
@pytest.mark.parametrize("method", ["tucker", "lora"])
def test_default_model_type_deberta_v2(method: str, tiny_deberta_dir: Path, glue_dir: Path, tmp_path: Path):
    """The recipe's default model type (DeBERTaV3 is a deberta-v2): the authors' six matrices per layer are adapted,
    the pooler and classifier are trained, and the saved adapter reloads to the same logits."""
    out = tmp_path / method
    args = base_args(tiny_deberta_dir, glue_dir, out, "rte", method, 6)
    saved = main(args + ["--rank", "4", "--r_max", "8", "--core_steps", "2", "--augment_start_step", "2"])
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_deberta_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    prefix = "base_model.model.deberta.encoder.layer.0."
    layer0 = {
        name.removeprefix(prefix)
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and name.startswith(prefix)
    }
    assert layer0 == {"attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                      "attention.output.dense", "intermediate.dense", "output.dense"}  # fmt: skip
    trained = {n for n, _ in model.named_parameters() if ".modules_to_save." in n}
    assert any(n.startswith("base_model.model.pooler.") for n in trained)
    assert any(n.startswith("base_model.model.classifier.") for n in trained)
    if method == "tucker":
        assert len(saved["final_ranks"]) == 12  # 2 layers x 6 matrices
    logits = reload_logits(out, tiny_deberta_dir, 2, tiny_batch(tiny_deberta_dir))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["tucker", "lora"])
def test_short_regression_run_is_no_worse_than_the_mean(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, method):
    """STS-B: the head starts at the training labels' mean, so even 2 tiny steps predict near it; from a bias of 0
    the dev MSE would be about mean^2 + variance (here ~8.5 against ~2)."""
    from tasks import load_glue

    out = tmp_path / method
    main(base_args(tiny_bert_dir, glue_dir, out, "stsb", method, 2) + ["--learning_rate", "1e-5"])
    splits = load_glue("stsb", glue_dir)
    train_mean = float(np.mean(list(splits["train"]["label"])))
    dev = splits["validation"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    batch = tokenizer(list(dev["sentence1"]), list(dev["sentence2"]), padding=True, return_tensors="pt")
    scores = reload_logits(out, tiny_bert_dir, 1, dict(batch)).squeeze(-1).double().numpy()
    labels = np.asarray(list(dev["label"]), dtype=np.float64)
    mse, mse_of_mean = np.mean((scores - labels) ** 2), np.mean((train_mean - labels) ** 2)
    assert mse <= 1.05 * mse_of_mean, (mse, mse_of_mean)
    assert abs(scores.mean() - train_mean) < 0.2


@needs_tucker
def test_tucker_budget_as_a_fraction_of_lora(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    """`--budget_fraction_of_lora 0.5`: half of what LoRA r=8 trains on the same 12 layers, the head not counted; the
    final adapter stays within it and the saved config carries it."""
    out = tmp_path / "budget"
    args = base_args(tiny_bert_dir, glue_dir, out, "rte", "tucker", 12)
    args += ["--rank", "4", "--r_max", "8", "--core_steps", "2", "--augment_start_step", "2", "--tau", "0.01"]
    saved = main(args + ["--budget_fraction_of_lora", "0.5", "--budget_ramp", "0.5"])
    lora_adapter = 2 * 8 * (3 * (32 + 32) + (32 + 32) + (32 + 64) + (64 + 32))  # as in test_lora_on_mrpc
    assert saved["head_parameters"] == 32 * 2 + 2
    assert saved["lora_r8_adapter_parameters"] == lora_adapter == saved["lora_r8_parameters"] - 66
    assert saved["param_budget"] == lora_adapter // 2
    assert saved["active_adapter_parameters"] == saved["active_trainable_parameters"] - 66 <= lora_adapter // 2
    written = json.loads((out / "metrics.json").read_text())
    assert written["param_budget"] == lora_adapter // 2
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (adapter_config["param_budget"], adapter_config["budget_ramp"]) == (lora_adapter // 2, 0.5)
    state = json.loads((out / "trainer_state.json").read_text())
    assert any(entry.get("tucker_param_budget") == lora_adapter // 2 for entry in state["log_history"])


@needs_tucker
def test_tucker_param_budget_flag_and_its_errors(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path):
    args = base_args(tiny_bert_dir, glue_dir, tmp_path / "direct", "rte", "tucker", 6)
    args += ["--rank", "2", "--r_max", "4", "--core_steps", "2", "--augment_start_step", "2", "--tau", "0.01"]
    saved = main(args + ["--param_budget", "2000"])
    assert saved["param_budget"] == 2000 and saved["active_adapter_parameters"] <= 2000
    # every mode at r_min = 1: 1 + in + out per layer, 12 layers of the 2-layer BERT
    smallest = 2 * (3 * 65 + 65 + 97 + 97)
    with pytest.raises(ValueError, match=rf"`param_budget` .* must be >= {smallest}, the smallest feasible budget"):
        main(args + ["--param_budget", str(smallest - 1)])
    with pytest.raises(ValueError, match=r"give `--param_budget` or `--budget_fraction_of_lora`, not both"):
        main(args + ["--param_budget", "2000", "--budget_fraction_of_lora", "0.5"])
    with pytest.raises(ValueError, match=r"`--budget_fraction_of_lora` must be a number > 0; got 0.0"):
        main(args + ["--budget_fraction_of_lora", "0"])
    with pytest.raises(ValueError, match=r"the parameter budget flags are for `--method tucker`"):
        main(base_args(tiny_bert_dir, glue_dir, tmp_path / "lora", "rte", "lora", 2) + ["--param_budget", "2000"])
