"""Classification metrics from labels and predictions, numpy only: `pipeline evaluate`, the quantize report and the
training summary compute them here, the same way.

The per-class figures are scikit-learn's `classification_report` (tests/test_evaluate.py checks them against it):
the classes reported are those in the labels or the predictions, and a figure whose denominator is 0 (precision
of a class never predicted, recall of a class absent from the labels) is 0.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, shape (num_classes, num_classes): row = true class, column = predicted class."""
    labels, predicted = _indices(labels, predicted)
    flat = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def classification_report(labels: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, and precision, recall, F1 and support per class with their macro and weighted averages, for true
    class indices `labels` and predicted ones `predicted` (indices into `class_names`):

        {"accuracy": 0.93, "images": 10000,
         "per_class": {"Coat": {"precision": .., "recall": .., "f1": .., "support": 1000}, ...},
         "macro": {"precision": .., "recall": .., "f1": .., "support": 10000}, "weighted": {...}}

    per_class holds the classes found in `labels` or `predicted`, in the order of `class_names`.
    """
    labels, predicted = _indices(labels, predicted)
    if len(labels) == 0:
        raise ValueError("no predictions to report on")
    matrix = confusion_matrix(labels, predicted, len(class_names))
    present = np.flatnonzero(matrix.sum(0) + matrix.sum(1))
    hits = np.diag(matrix)[present].astype(np.float64)
    support = matrix.sum(1)[present]
    precision = _share(hits, matrix.sum(0)[present])
    recall = _share(hits, support)
    f1 = _share(2 * precision * recall, precision + recall)
    rows = np.stack([precision, recall, f1])
    return {
        "accuracy": float(hits.sum() / len(labels)),
        "images": len(labels),
        "per_class": {class_names[c]: _row(*rows[:, i], support[i]) for i, c in enumerate(present.tolist())},
        "macro": _row(*rows.mean(1), support.sum()),
        "weighted": _row(*(rows @ support / support.sum()), support.sum()),
    }


def ranked(scores: np.ndarray, k: int) -> np.ndarray:
    """The class indices of the `k` highest of each row of `scores` (N, classes), highest first; of equal scores
    the lower class index comes first. Every ranking in serve, evaluate and the quantize report is this one."""
    return np.argsort(-scores, axis=1, kind="stable")[:, : max(k, 0)]


def top_k_accuracy(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """The share of images whose true class is among the `k` highest of their row of `scores` (N, classes), ranked
    by `ranked`."""
    return float(np.mean(np.any(ranked(scores, k) == np.asarray(labels)[:, None], axis=1)))


def _indices(labels: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, predicted = np.asarray(labels, dtype=np.int64).ravel(), np.asarray(predicted, dtype=np.int64).ravel()
    if labels.shape != predicted.shape:
        raise ValueError(f"{len(labels)} labels but {len(predicted)} predictions")
    return labels, predicted


def _share(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division default)."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def _row(precision: float, recall: float, f1: float, support: int) -> dict:
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(support)}
