"""``--sweep``: choose a head's regularisation on a validation split carved from the training rows.

:class:`SweptHead` is a scikit-learn meta-estimator, like ``LogisticRegressionCV``: the workflow
calls ``fit`` and the strategy (one batched pass for the torch linear head, one fit per value
otherwise) lives behind it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.validation import check_is_fitted

from ..errors import FeatxError
from ..splits import stratified_holdout

__all__ = ["SweepResult", "SweptHead", "sweep"]

_logger = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """What ``--sweep`` tried and chose."""

    params: list[str]  # swept parameter names
    curve: list[dict] = field(default_factory=list)  # [{'params': {...}, 'val_accuracy': float}] in grid order
    best: dict = field(default_factory=dict)  # chosen parameter values
    best_val_accuracy: float = float("nan")
    n_train: int = 0  # rows the grid was trained on
    n_val: int = 0  # rows it was scored on
    seconds: float = 0.0  # time of the grid (without the refit)
    batched: bool = False  # True when the grid was trained in one batched pass

    def to_dict(self) -> dict:
        return {"params": self.params, "best": self.best, "best_val_accuracy": self.best_val_accuracy, "curve": self.curve,
                "n_train": self.n_train, "n_val": self.n_val, "seconds": self.seconds, "batched": self.batched}


def validation_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The sweep's (train rows, validation rows): the stratified hold-out every class must appear in."""
    counts = np.unique(y, return_counts=True)[1]
    if counts.min() < 2:
        raise FeatxError("a class has a single training example, too few for a validation split; drop --sweep")
    if len(y) < 2 * len(counts):
        raise FeatxError(f"{len(y)} training rows are too few to carve a validation split for --sweep; drop --sweep")
    return stratified_holdout(y, val_fraction, seed)


def _scores_batched(pipeline, grid, X_tr, y_tr, X_va, y_va) -> list[float]:
    """Validation accuracy of every grid entry, the torch linear heads trained in one batched pass."""
    pre = clone(pipeline[:-1]).fit(X_tr, y_tr) if len(pipeline) > 1 else None
    Z_tr = pre.transform(X_tr) if pre is not None else X_tr
    Z_va = pre.transform(X_va) if pre is not None else X_va
    fitted = clone(pipeline.named_steps["head"]).fit_grid(Z_tr, y_tr, grid)
    return [float(est.score(Z_va, y_va)) for est in fitted]


def _scores_per_value(pipeline, grid, X_tr, y_tr, X_va, y_va) -> list[float]:
    """Validation accuracy of every grid entry, one fit each."""
    scores = []
    for entry in grid:
        est = clone(pipeline).set_params(**{f"head__{k}": v for k, v in entry.items()})
        scores.append(float(est.fit(X_tr, y_tr).score(X_va, y_va)))
    return scores


class SweptHead(ClassifierMixin, BaseEstimator):
    """``pipeline`` with its head's parameters chosen among ``grid`` on a validation split, then refit on all rows.

    ``grid`` is a list of dicts of head parameters; ties go to the first entry. Fitted attributes:
    ``best_params_``, ``best_estimator_`` (the refit pipeline), ``result_`` (:class:`SweepResult`).
    """

    def __init__(self, pipeline, grid: list[dict], *, val_fraction: float = 0.2, random_state: int = 0):
        self.pipeline = pipeline
        self.grid = grid
        self.val_fraction = val_fraction
        self.random_state = random_state

    def fit(self, X, y):
        y = np.asarray(y)
        result = SweepResult(params=sorted({k for g in self.grid for k in g}))
        if self.grid:
            self._search(X, y, result)
        final = clone(self.pipeline).set_params(**{f"head__{k}": v for k, v in result.best.items()})
        self.best_estimator_ = final.fit(X, y)
        self.best_params_, self.result_ = dict(result.best), result
        self.classes_ = self.best_estimator_.classes_
        return self

    def _search(self, X, y, result: SweepResult) -> None:
        idx_tr, idx_va = validation_split(y, self.val_fraction, self.random_state)
        result.n_train, result.n_val = len(idx_tr), len(idx_va)
        batched = hasattr(self.pipeline.named_steps["head"], "fit_grid")
        strategy = _scores_batched if batched else _scores_per_value
        t0 = time.perf_counter()
        scores = strategy(self.pipeline, self.grid, X[idx_tr], y[idx_tr], X[idx_va], y[idx_va])
        result.seconds, result.batched = time.perf_counter() - t0, batched
        result.curve = [{"params": entry, "val_accuracy": s} for entry, s in zip(self.grid, scores)]
        best = int(np.argmax(scores))
        result.best, result.best_val_accuracy = dict(self.grid[best]), scores[best]
        _logger.debug("sweep %s: best %s (validation accuracy %.4f)", result.params, result.best, result.best_val_accuracy)

    def predict(self, X):
        check_is_fitted(self)
        return self.best_estimator_.predict(X)

    def predict_proba(self, X):
        check_is_fitted(self)
        return self.best_estimator_.predict_proba(X)

    def decision_function(self, X):
        check_is_fitted(self)
        return self.best_estimator_.decision_function(X)


def sweep(pipeline, X: np.ndarray, y: np.ndarray, grid: list[dict], *, val_fraction: float = 0.2,
          random_state: int = 0):
    """(refit pipeline, :class:`SweepResult`): :class:`SweptHead` fitted on (X, y)."""
    swept = SweptHead(pipeline, grid, val_fraction=val_fraction, random_state=random_state).fit(X, y)
    return swept.best_estimator_, swept.result_
