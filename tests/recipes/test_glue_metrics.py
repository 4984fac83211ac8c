"""GLUE metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from metrics import (
    accuracy,
    compute_metrics,
    f1_binary,
    majority_baseline,
    matthews_correlation,
    pearson,
    predictions_from_logits,
    roc_auc,
    scores_from_logits,
    spearman,
)


def test_accuracy_and_f1():
    predictions, labels = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 0, 1])
    assert accuracy(predictions, labels) == 0.8
    # TP 2, FP 1, FN 0: precision 2/3, recall 1, F1 = 2 * (2/3) / (5/3) = 0.8
    assert f1_binary(predictions, labels) == pytest.approx(0.8)
    assert f1_binary(np.zeros(3, dtype=int), np.array([1, 0, 1])) == 0.0


def test_matthews_binary_by_hand():
    predictions, labels = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 0, 1])
    # (TP * TN - FP * FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN)) = (2 * 2 - 1 * 0) / sqrt(3 * 2 * 3 * 2)
    assert matthews_correlation(predictions, labels) == pytest.approx(4 / 6)
    assert matthews_correlation(np.array([1, -1, 1, 1]), np.array([1, 1, 1, -1])) == pytest.approx(-1 / 3)


def test_matthews_constant_prediction_is_zero():
    assert matthews_correlation(np.ones(4, dtype=int), np.array([0, 1, 0, 1])) == 0.0


def test_matthews_multiclass_by_hand():
    labels, predictions = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2])
    # c = 3 correct of s = 4; true counts t = (1, 1, 2); predicted counts p = (1, 0, 3)
    # (c * s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) = (12 - 7) / sqrt((16 - 10)(16 - 6))
    assert matthews_correlation(predictions, labels) == pytest.approx(5 / math.sqrt(60))


def test_correlations_by_hand():
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(0.5)
    assert spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 10.0, 100.0, 1000.0])) == pytest.approx(1.0)
    assert pearson(np.array([1.0, 2.0, 3.0, 4.0]), np.array([4.0, 3.0, 2.0, 1.0])) == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("task", "keys"),
    [
        ("cola", {"matthews_correlation", "accuracy"}),
        ("sst2", {"accuracy"}),
        ("mrpc", {"accuracy", "f1"}),
        ("qqp", {"accuracy", "f1"}),
        ("mnli", {"accuracy"}),
        ("qnli", {"accuracy"}),
        ("rte", {"accuracy"}),
    ],
)
def test_task_metric_sets(task: str, keys: set[str]):
    assert set(compute_metrics(task, np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))) == keys


def test_stsb_scores_from_one_output():
    logits = np.array([[0.5], [2.0], [4.5]])
    scores = predictions_from_logits("stsb", logits)
    assert scores.tolist() == [0.5, 2.0, 4.5]
    result = compute_metrics("stsb", scores, np.array([1.0, 2.0, 4.0]))
    assert set(result) == {"pearson", "spearman"} and result["spearman"] == pytest.approx(1.0)


def test_classification_predictions_are_argmax():
    assert predictions_from_logits("mnli", np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])).tolist() == [1, 0]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"same shape; got \(2,\) and \(3,\)"):
        compute_metrics("sst2", np.array([0, 1]), np.array([0, 1, 1]))


def test_majority_baseline_predicts_the_most_frequent_training_label():
    train = np.array([1, 1, 1, 0])  # class 1 is the majority in training, class 0 on the evaluation rows
    assert majority_baseline("mrpc", train, np.array([0, 0, 1, 0])) == {"accuracy": 0.25, "f1": pytest.approx(0.4)}
    assert majority_baseline("cola", train, np.array([0, 1, 1]))["matthews_correlation"] == 0.0
    assert majority_baseline("stsb", np.array([1.0, 2.0]), np.array([3.0, 4.0])) is None


def test_roc_auc_counts_ordered_pairs_ties_half():
    """Against the definition: over every (class 1, class 0) pair of rows, 1 when the class-1 row scores higher,
    1/2 on a tie; the mean of those."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # rounded: many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    by_pairs = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert roc_auc(scores, labels) == pytest.approx(by_pairs, abs=1e-12)
    assert roc_auc(np.array([0.1, 0.9, 0.4]), np.array([0, 1, 0])) == 1.0
    assert roc_auc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0
    # only the order matters: a threshold shift that changes the accuracy leaves it as it is
    assert roc_auc(scores + 3.0, labels) == roc_auc(scores, labels)


def test_roc_auc_rejects_what_it_cannot_rank():
    with pytest.raises(ValueError, match=r"both classes; got 3 of class 1 and 0 of class 0"):
        roc_auc(np.array([0.1, 0.2, 0.3]), np.array([1, 1, 1]))
    with pytest.raises(ValueError, match=r"labels 0 and 1; got \[0, 2\]"):
        roc_auc(np.array([0.1, 0.2]), np.array([0, 2]))
    with pytest.raises(ValueError, match=r"same shape; got \(2,\) and \(3,\)"):
        roc_auc(np.array([0.1, 0.2]), np.array([0, 1, 1]))


def test_scores_are_the_logit_margin_of_two_class_tasks_only():
    logits = np.array([[0.5, 2.0], [1.0, -1.0]])
    assert scores_from_logits("sst2", logits).tolist() == [1.5, -2.0]
    assert scores_from_logits("rte", logits).tolist() == [1.5, -2.0]
    assert scores_from_logits("mnli", np.zeros((2, 3))) is None
    assert scores_from_logits("stsb", np.zeros((2, 1))) is None
