"""Likely label errors and confusable classes, from out-of-fold probabilities of featx's swept logistic regression.

Every training row gets its class probabilities from a model fitted on the other folds (its C chosen by validation log-loss), never
on itself; cleanlab's ``find_label_issues`` ranks the rows whose given label those probabilities doubt
(featx does not re-implement it), and the out-of-fold confusion names the class pairs the features mix up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..splits import stratified_folds

__all__ = ["LabelCheck", "out_of_fold_probabilities", "probability_head", "label_issues", "confusable_pairs", "label_rows"]


@dataclass
class LabelCheck:
    """What the label checks found, or why they did not run."""

    skipped: str | None = None  # the reason the checks did not run
    rows: np.ndarray | None = None  # row numbers checked (training split, classes with enough rows)
    classes: np.ndarray | None = None  # class index of every probability column
    probabilities: np.ndarray | None = None  # [n, K] out-of-fold class probabilities
    suspects: list[dict] = field(default_factory=list)  # cleanlab's issues, most doubtful first
    confusable: list[dict] = field(default_factory=list)
    accuracy: float | None = None  # out-of-fold accuracy of the swept logistic regression
    chosen_C: list[float] = field(default_factory=list)  # C chosen by the sweep of every fold
    left_out: list[str] = field(default_factory=list)  # classes with too few rows for the folds


def label_rows(labels: np.ndarray, train_rows: np.ndarray, class_names: list[str], folds: int) -> tuple[np.ndarray, list[str], str | None]:
    """(rows to check, classes left out for having fewer than ``folds`` rows, reason to skip or None)."""
    y = labels[train_rows]
    rows = train_rows[y >= 0]
    if not len(rows):
        return rows, [], "the training split has no labels"
    classes, counts = np.unique(labels[rows], return_counts=True)
    small = classes[counts < folds]
    left_out = [f"{class_names[c]} ({n})" for c, n in zip(classes, counts) if n < folds]
    rows = rows[~np.isin(labels[rows], small)]
    if len(classes) < 2:
        return rows, left_out, f"the training split holds a single class ('{class_names[classes[0]]}'); there is no other label to suggest"
    if len(np.unique(labels[rows])) < 2:
        return rows, left_out, f"fewer than two classes have {folds} training images or more (the folds need {folds} per class)"
    return rows, left_out, None


def out_of_fold_probabilities(X: np.ndarray, y: np.ndarray, *, folds: int, seed: int, device: str) -> tuple[np.ndarray, list[float]]:
    """([n, K] probabilities of classes 0..K-1, C chosen per fold): for every fold, featx's logistic regression with its C
    chosen on a validation part of the other folds (:func:`probability_head`), refitted on them, predicts the held-out fold."""
    from ..heads import full_scores

    n_classes = int(y.max()) + 1
    probs, chosen = np.full((len(y), n_classes), np.nan), []
    for train, held in stratified_folds(y, folds, seed):
        fitted, C = probability_head(X[train], y[train], seed=seed, device=device)
        probs[held] = full_scores(fitted, X[held], n_classes)
        chosen.append(C)
    assert np.isfinite(probs).all(), "every row is held out by exactly one fold"
    return probs, chosen


def probability_head(X: np.ndarray, y: np.ndarray, *, seed: int, device: str):
    """(featx's logistic regression refitted on every row, its C): the C of the grid whose probabilities have the lowest
    log-loss on the sweep's validation rows. cleanlab ranks by the probabilities, so C is chosen for them, not for the
    accuracy the sweep chooses by (where many C tie and the one chosen may be weakly regularised and overconfident)."""
    from sklearn.base import clone
    from sklearn.metrics import log_loss

    from ..heads import grid_of, make_head
    from ..heads._sweep import _transformed, validation_split

    grid = grid_of("logreg")
    pipeline = make_head("logreg", random_state=seed, device=device)
    fit, val = validation_split(y, 0.2, seed)
    Z_fit, Z_val = _transformed(pipeline, X[fit], y[fit], X[val])  # the sweep's preprocessing, fitted on the fit rows
    heads = clone(pipeline[-1]).fit_grid(Z_fit, y[fit], grid)
    losses = [log_loss(y[val], head.predict_proba(Z_val), labels=head.classes_) for head in heads]
    C = float(grid[int(np.argmin(losses))]["C"])
    return clone(pipeline).set_params(head__C=C).fit(X, y), C


def label_issues(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions of cleanlab's label issues, most doubtful first; every row's label quality): cleanlab's
    ``find_label_issues`` (pruning by its estimated noise rates) ranked by self-confidence, the out-of-fold
    probability of the given label."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    ranked = find_label_issues(labels=y, pred_probs=probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    return np.asarray(ranked, dtype=np.int64), get_label_quality_scores(y, probs, method="self_confidence")


def confusable_pairs(y: np.ndarray, predicted: np.ndarray, class_names: list[str], classes: np.ndarray, top: int) -> list[dict]:
    """Class pairs by the share of their images the out-of-fold predictions give to the other class of the pair."""
    from sklearn.metrics import confusion_matrix

    K = len(classes)
    cm = confusion_matrix(y, predicted, labels=np.arange(K))
    counts = cm.sum(1)
    pairs = []
    for a in range(K):
        for b in range(a + 1, K):
            mixed = int(cm[a, b] + cm[b, a])
            if mixed:
                pairs.append({"a": class_names[classes[a]], "b": class_names[classes[b]], "a_as_b": int(cm[a, b]), "b_as_a": int(cm[b, a]),
                              "n_a": int(counts[a]), "n_b": int(counts[b]), "share": round(mixed / int(counts[a] + counts[b]), 5)})
    pairs.sort(key=lambda p: (-p["share"], -(p["a_as_b"] + p["b_as_a"])))
    return pairs[:top] if top else pairs
