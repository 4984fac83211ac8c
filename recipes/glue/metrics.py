"""GLUE metrics in numpy and scipy: accuracy, binary F1, Matthews correlation, Pearson and Spearman correlation;
and, for two-class tasks, the area under the ROC curve of each row's score (not a GLUE metric: a threshold-free one).

```python
>>> import numpy as np
>>> compute_metrics("mrpc", np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1]))
{'accuracy': 0.75, 'f1': 0.8}
```
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from tasks import get_task


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to the labels."""
    return float(np.mean(predictions == labels))


def f1_binary(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 score of class `positive` (GLUE's F1 for MRPC and QQP); 0 when there is no true positive."""
    true_positive = np.sum((predictions == positive) & (labels == positive))
    if true_positive == 0:
        return 0.0
    precision = true_positive / np.sum(predictions == positive)
    recall = true_positive / np.sum(labels == positive)
    return float(2 * precision * recall / (precision + recall))


def matthews_correlation(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient (multi-class form, equal to the binary phi coefficient for two classes).

    0 when either the predictions or the labels hold a single class (the coefficient is undefined there).
    """
    classes = np.union1d(predictions, labels)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (np.searchsorted(classes, labels), np.searchsorted(classes, predictions)), 1)
    n = confusion.sum()
    correct = np.trace(confusion)
    true_per_class = confusion.sum(axis=1)
    predicted_per_class = confusion.sum(axis=0)
    numerator = correct * n - true_per_class @ predicted_per_class
    denominator = np.sqrt(
        (n**2 - predicted_per_class @ predicted_per_class) * (n**2 - true_per_class @ true_per_class)
    )
    return 0.0 if denominator == 0 else float(numerator / denominator)


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation of two score vectors."""
    return float(stats.pearsonr(predictions, labels)[0])


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation of two score vectors."""
    return float(stats.spearmanr(predictions, labels)[0])


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` (higher: class 1) against 0/1 `labels`: the chance that a random row of
    class 1 scores above a random row of class 0, ties counting half (the Mann-Whitney statistic). It does not depend
    on the decision threshold, which moves a short run's accuracy by a point or more from seed to seed."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same shape; got {scores.shape} and {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"ROC AUC needs labels 0 and 1; got {sorted(np.unique(labels).tolist())[:10]}")
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC AUC needs rows of both classes; got {n_pos} of class 1 and {n_neg} of class 0")
    ranks = stats.rankdata(scores)  # ties get their average rank
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


METRICS = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearman": spearman,
    "roc_auc": roc_auc,  # from scores, not class predictions (`scores_from_logits`)
}


def compute_metrics(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Compute `task`'s metrics from predictions (class indices, or scores for STS-B) and labels."""
    spec = get_task(task)
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(
            f"predictions and labels must have the same shape; got {predictions.shape} and {labels.shape}"
        )
    return {name: METRICS[name](predictions, labels) for name in spec.metrics}


def majority_baseline(task: str, train_labels: np.ndarray, eval_labels: np.ndarray) -> dict[str, float] | None:
    """`task`'s metrics for always predicting the training rows' most frequent class: the score a run must clearly
    beat to have learned anything (0 MCC on CoLA, about 68% accuracy on MRPC). `None` for regression, where a
    constant prediction has no correlation."""
    if get_task(task).is_regression:
        return None
    classes, counts = np.unique(np.asarray(train_labels), return_counts=True)
    eval_labels = np.asarray(eval_labels)
    return compute_metrics(task, np.full_like(eval_labels, classes[np.argmax(counts)]), eval_labels)


def predictions_from_logits(task: str, logits: np.ndarray) -> np.ndarray:
    """Class indices (argmax over the last axis), or the single output as a score for regression tasks."""
    logits = np.asarray(logits)
    if get_task(task).is_regression:
        return logits.reshape(-1)
    return np.argmax(logits, axis=-1)


def scores_from_logits(task: str, logits: np.ndarray) -> np.ndarray | None:
    """For a two-class task, each row's margin `logit_1 - logit_0` (what `roc_auc` ranks); `None` for other tasks."""
    if get_task(task).num_labels != 2:
        return None
    logits = np.asarray(logits)
    return logits[..., 1] - logits[..., 0]


def row_record(task: str, logits: np.ndarray, labels: np.ndarray) -> tuple[dict[str, list], float | None]:
    """Each row's prediction, for a two-class task its score (`scores_from_logits`, 6 significant digits: the ranks
    are kept, the file stays small) and its label, in row order, for `predictions.json`; with the ROC AUC of the
    scores when the rows hold both classes, else `None`."""
    labels = np.asarray(labels)
    record: dict[str, list] = {"predictions": predictions_from_logits(task, logits).tolist()}
    scores = scores_from_logits(task, logits)
    auc = None
    if scores is not None:
        record["scores"] = [float(f"{x:.6g}") for x in scores]
        if len(np.unique(labels)) == 2:
            auc = roc_auc(scores, labels)
    record["labels"] = labels.tolist()
    return record, auc
