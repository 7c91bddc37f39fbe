"""Classification metrics in one schema, shared by fitted heads and fine-tuning runs."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, top_k_accuracy_score

__all__ = ["classification_metrics", "balanced_accuracy", "confusion", "per_class_report", "softmax"]


def classification_metrics(y_true, y_pred, proba=None, *, n_classes: int | None = None) -> dict:
    """accuracy, balanced_accuracy, macro_f1 (and top5_accuracy when ``proba`` has more than 5 classes).

    ``proba`` is [n, n_classes] with columns in class-index order 0..n_classes-1.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    labels = np.arange(n_classes) if n_classes else np.unique(np.concatenate([y_true, y_pred]))
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "macro_f1": float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0)),
    }
    if proba is not None and proba.shape[1] > 5:
        out["top5_accuracy"] = float(top_k_accuracy_score(y_true, proba, k=5, labels=labels))
    return out


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes present in ``y_true`` (scikit-learn's definition, without its warning when
    ``y_pred`` holds classes that ``y_true`` lacks: those have no recall to average)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.unique(y_true)
    return float(np.mean([(y_pred[y_true == c] == c).mean() for c in classes]))


def confusion(y_true, y_pred, n_classes: int) -> np.ndarray:
    return confusion_matrix(y_true, y_pred, labels=np.arange(n_classes))


def per_class_report(y_true, y_pred, class_names: list[str]) -> list[dict]:
    """precision, recall, f1 and support of every class (rows in class-index order)."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = np.arange(len(class_names))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return [{"class": name, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)]


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of scores [n, K] (shifted by each row's maximum, so large logits do not overflow), in z's dtype."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
