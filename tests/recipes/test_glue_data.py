"""GLUE data path of the recipe: TSV parsing (quoting disabled), sentence pairs, label maps, regression, dev splits."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from glue_fixtures import REPO, glue_rows, write_tsv
from tasks import TASKS, get_task, load_glue, parse_rows, read_tsv, take_subset

QUOTED = 'he said "good film'
SHARED_GLUE = REPO.parent / "shared" / "data" / "glue"


def test_every_task_is_defined():
    assert sorted(TASKS) == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match=r"`--task` must be one of \['cola', .*\]; got 'sst-2'"):
        get_task("sst-2")


def test_read_tsv_keeps_bare_quotes(tmp_path: Path):
    path = tmp_path / "x.tsv"
    path.write_text('sentence\tlabel\nhe said "good film\t1\nit \'s "fine" \t0\n', encoding="utf-8")
    assert read_tsv(path) == [["sentence", "label"], [QUOTED, "1"], ['it \'s "fine" ', "0"]]


@pytest.mark.parametrize(
    ("task", "folder", "labels"),
    [
        ("cola", "CoLA", [0, 1, 0, 1]),
        ("sst2", "SST-2", [0, 1, 0, 1]),
        ("mrpc", "MRPC", [0, 1, 0, 1]),
        ("qqp", "QQP", [0, 1, 0, 1]),
        ("qnli", "QNLI", [0, 1, 0, 1]),  # entailment, not_entailment
        ("rte", "RTE", [0, 1, 0, 1]),
        ("mnli", "MNLI", [0, 1, 2, 0]),  # entailment, neutral, contradiction
    ],
)
def test_classification_tasks_parse(glue_dir: Path, task: str, folder: str, labels: list[int]):
    splits = load_glue(task, glue_dir)
    spec = TASKS[task]
    assert set(splits) == {"train", *spec.eval_splits}
    assert len(splits["train"]) == 32  # CoLA has no header: no row may be taken for one
    assert list(splits["train"]["label"][:4]) == labels
    expected_columns = {"sentence1", "sentence2", "label"} if spec.is_pair else {"sentence1", "label"}
    assert set(splits["train"].column_names) == expected_columns
    raw = glue_rows(folder, "train", 32)
    body = raw if task == "cola" else raw[1:]
    first, second = {
        "cola": (3, None), "sst2": (0, None), "mrpc": (3, 4), "qqp": (3, 4), "qnli": (1, 2), "rte": (1, 2),
        "mnli": (8, 9),
    }[task]  # fmt: skip
    assert splits["train"][1]["sentence1"] == body[1][first]
    if second is not None:
        assert splits["train"][1]["sentence2"] == body[1][second]
    assert splits["train"].features["label"].names == list(spec.label_names)


@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "stsb"])
def test_quoted_sentence_survives(glue_dir: Path, task: str):
    assert load_glue(task, glue_dir)["train"][0]["sentence1"] == QUOTED


def test_stsb_is_regression_on_pairs(glue_dir: Path):
    splits = load_glue("stsb", glue_dir)
    assert TASKS["stsb"].num_labels == 1 and TASKS["stsb"].is_regression
    assert list(splits["train"]["label"][:3]) == pytest.approx([0.0, 0.37, 0.74])
    assert splits["validation"][2]["sentence2"] == glue_rows("STS-B", "dev", 12)[3][8]
    assert len(splits["validation"]) == 12


def test_mnli_has_matched_and_mismatched_dev(glue_dir: Path):
    splits = load_glue("mnli", glue_dir)
    assert len(splits["validation_matched"]) == 12 and len(splits["validation_mismatched"]) == 12
    assert list(splits["validation_mismatched"]["label"][:4]) == [0, 1, 2, 0]


def test_unknown_label_is_an_error(tmp_path: Path):
    rows = [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entails"]]
    with pytest.raises(ValueError, match=r"x\.tsv, line 2: the label of 'rte' must be one of .*; got 'entails'"):
        parse_rows(TASKS["rte"], rows, source="x.tsv")


def test_missing_column_is_an_error():
    with pytest.raises(ValueError, match=r"must have a column 'Quality'"):
        parse_rows(TASKS["mrpc"], [["#1 String", "#2 String"], ["a", "b"]], source="dev.tsv")


def test_short_rows_are_skipped_with_a_warning(caplog: pytest.LogCaptureFixture):
    rows = [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], ["1", "2", "3", "q1", "q2", "1"], ["4"]]
    with caplog.at_level(logging.WARNING):
        columns = parse_rows(TASKS["qqp"], rows, source="train.tsv")
    assert columns == {"sentence1": ["q1"], "sentence2": ["q2"], "label": [1]}
    assert "skipped 1 row(s)" in caplog.text


def test_missing_file_names_the_expected_layout(tmp_path: Path):
    write_tsv(tmp_path / "RTE" / "train.tsv", glue_rows("RTE", "train", 4))
    with pytest.raises(ValueError, match=r"`--data_dir` must hold RTE/dev\.tsv"):
        load_glue("rte", tmp_path)


def test_subset_is_seeded_and_sized(glue_dir: Path):
    train = load_glue("sst2", glue_dir)["train"]
    a, b = take_subset(train, 10, seed=3), take_subset(train, 10, seed=3)
    assert len(a) == 10 and list(a["sentence1"]) == list(b["sentence1"])
    assert list(take_subset(train, 10, seed=4)["sentence1"]) != list(a["sentence1"])
    assert take_subset(train, None, seed=0) is train
    with pytest.raises(ValueError, match=r"`--max_train_samples` must be a positive integer; got 0"):
        take_subset(train, 0, seed=0)


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="../shared/data/glue is not on this machine")
@pytest.mark.parametrize(("task", "train", "dev"), [("cola", 8551, 1043), ("mrpc", 3668, 408), ("rte", 2490, 277)])
def test_shared_glue_row_counts(task: str, train: int, dev: int):
    splits = load_glue(task, SHARED_GLUE)
    assert (len(splits["train"]), len(splits["validation"])) == (train, dev)


@pytest.mark.parametrize(
    ("task", "columns", "splits"),
    [
        ("mnli", ("premise", "hypothesis"), ("train", "validation_matched", "validation_mismatched")),
        ("qnli", ("question", "sentence"), ("train", "validation")),
        ("stsb", ("sentence1", "sentence2"), ("train", "validation")),
        ("sst2", ("sentence",), ("train", "validation")),
    ],
)
def test_hub_columns_are_normalized(monkeypatch: pytest.MonkeyPatch, task: str, columns: tuple, splits: tuple):
    """Without --data_dir the hub's GLUE dataset is used (faked here: no network in tests)."""
    import datasets

    spec = TASKS[task]
    labels = [1.5, 4.0] if spec.is_regression else [1, 0]
    fake = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({**{c: [f"{c} {split} a", f"{c} {split} b"] for c in columns},
                                           "label": labels, "idx": [0, 1]})
        for split in (*splits, "test")
    })  # fmt: skip
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append(args) or fake)
    loaded = load_glue(task)
    assert calls == [("nyu-mll/glue", task)]
    assert set(loaded) == set(splits)
    expected = {"sentence1", "sentence2", "label"} if spec.is_pair else {"sentence1", "label"}
    last = splits[-1]
    assert set(loaded[last].column_names) == expected
    assert loaded[last][1]["sentence1"] == f"{columns[0]} {last} b"
    if spec.is_pair:
        assert loaded[last][0]["sentence2"] == f"{columns[1]} {last} a"
    assert list(loaded["train"]["label"]) == pytest.approx(labels)
