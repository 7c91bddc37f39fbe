"""The linear probe a run starts from: featx's logistic regression on the frozen backbone's embeddings, C chosen on them.

Fine-tuning from a linear-probe start (LP-FT, Kumar et al. 2022) keeps the pretrained features from being torn
apart by the gradients of a random classifier. The probe is fitted twice: on the images the run trains on, C
chosen on them alone (the start every fine-tuned model is measured against on validation), and on every training image,
validation included, exactly as ``featx fit-head --head logreg --sweep --seed S`` fits it on the same images (the frozen
baseline the run reports, and the model it keeps when nothing beats the start). So a run that keeps the probe ships the
frozen swept logistic regression itself, not a second one with another C: on 160 training images, the two ways of
choosing C differed by up to 4 test points either way (benchmarks/RESULTS.md, finetune_search and finetune_report).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import clone

from ..heads import grid_of, heads_linear_map, make_head, sweep

__all__ = ["Probe", "fit_probe", "KFOLD_BELOW"]

_logger = logging.getLogger(__name__)

KFOLD_BELOW = 2000  # fewer training rows than this: C by stratified k-fold cross-validation, else on one hold-out (fit-head's)
_FOLDS = 5


@dataclass
class Probe:
    """The start (fitted on the training part) and the refit (on every training image), as classifier weights."""

    start: tuple[torch.Tensor, torch.Tensor]  # (weight [K, D], bias [K]) fitted on the training part
    refit: tuple[torch.Tensor, torch.Tensor]  # fit-head's swept logreg on the training part and the validation part
    info: dict  # head, chosen C, how it was chosen, image counts, seconds


def fit_probe(X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, n_classes: int, *, seed: int,
              device: str, source_order: np.ndarray | None = None) -> Probe:
    """A logistic regression on (X, y) with C chosen on (X, y) alone, and fit-head's swept one on (X, y) + (X_val, y_val).

    C is chosen by stratified k-fold cross-validation on small sets (one hold-out of 20% of 100 images is 20 images,
    too few to tell C values apart), by mean accuracy, ties to the lower mean log-loss; on larger sets on one
    stratified hold-out, as ``featx fit-head --sweep`` does. Standardisation is folded into the weights
    (logits = x @ W.T + b on raw embeddings). A class absent from the fitted rows gets zero weights and a bias far
    below the others, so it is never predicted.

    The refit is ``featx fit-head --sweep``'s: its grid, its stratified 20% hold-out drawn with ``seed``, its tie rule,
    on every training image in the source's order (``source_order``: the rows of (X, X_val) stacked, sorted as the
    source lists them, which is the order fit-head reads them from the store), so the hold-out is the same images.
    """
    t0 = time.perf_counter()
    pipeline = make_head("logreg", device=device, random_state=seed)
    grid = grid_of("logreg")
    folds = min(_FOLDS, int(np.unique(y, return_counts=True)[1].min()))
    if len(y) < KFOLD_BELOW and folds >= 2:
        chosen, score, how = _cross_validated_c(pipeline, grid, X, y, folds, seed)
        start = clone(pipeline).set_params(head__C=chosen["C"]).fit(X, y)
    else:
        start, result = sweep(pipeline, X, y, grid, random_state=seed)
        chosen, score, how = result.best, result.best_val_accuracy, f"a stratified 20% hold-out of the {len(y)} training images"
    order = np.arange(len(y) + len(y_val)) if source_order is None else np.asarray(source_order)
    refit, swept = sweep(pipeline, np.concatenate([X, X_val])[order], np.concatenate([y, y_val])[order], grid, random_state=seed)
    info = {"head": "logreg", "params": chosen, "sweep_val_accuracy": score, "chosen_by": how, "n_train": int(len(y)),
            "n_refit": int(len(y) + len(y_val)), "refit_params": dict(swept.best),
            "refit_chosen_by": f"featx fit-head --sweep: a stratified 20% hold-out of the {len(order)} training images, seed {seed}",
            "seconds": time.perf_counter() - t0}
    _logger.info("linear probe: C=%g chosen by %s (accuracy %.4f); refitted as fit-head --sweep on %d images (C=%g)", chosen["C"],
                 how, score, info["n_refit"], swept.best["C"])
    return Probe(_as_classifier(start, X.shape[1], n_classes), _as_classifier(refit, X.shape[1], n_classes), info)


def _cross_validated_c(pipeline, grid: list[dict], X: np.ndarray, y: np.ndarray, folds: int, seed: int):
    """(chosen {'C': c}, its mean fold accuracy, description): every C of ``grid`` on each fold in one batched solve."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    accuracy, loss = np.zeros(len(grid)), np.zeros(len(grid))
    for tr, va in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        pre = clone(pipeline[:-1]).fit(X[tr])
        Z_tr, Z_va = pre.transform(X[tr]), pre.transform(X[va])
        for g, est in enumerate(clone(pipeline.named_steps["head"]).fit_grid(Z_tr, y[tr], grid)):
            proba = est.predict_proba(Z_va)
            accuracy[g] += np.mean(est.classes_[proba.argmax(1)] == y[va]) / folds
            loss[g] += log_loss(y[va], proba, labels=est.classes_) / folds
    best_accuracy = accuracy.max()
    tied = np.flatnonzero(accuracy >= best_accuracy - 1e-9)
    g = int(tied[np.argmin(loss[tied])])
    return dict(grid[g]), float(accuracy[g]), f"{folds}-fold cross-validation on the {len(y)} training images"


def _as_classifier(pipeline, n_features: int, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias, classes = heads_linear_map(pipeline)
    W = np.zeros((n_classes, n_features), np.float64)
    b = np.full(n_classes, float(bias.min()) - 30.0)
    W[classes.astype(int)], b[classes.astype(int)] = weight, bias
    return torch.as_tensor(W, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
