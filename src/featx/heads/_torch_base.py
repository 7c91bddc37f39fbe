"""What the torch heads share: the scikit-learn estimator plumbing, early stopping, epochs, class weights."""

from __future__ import annotations

import math

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._available_if import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ..metrics import softmax
from ..splits import stratified_holdout

__all__ = ["AUTO_EARLY_STOPPING_ROWS", "early_stopping_split", "auto_epochs", "class_weights", "TorchHead", "LinearWeights"]

# With fewer rows, a 10% validation split is too small to judge an epoch by (accuracy moves in
# steps of 1/160 at 1,600 rows) and stopping early cost 3.5 accuracy points on CIFAR-10 features
# against running the whole cosine schedule (benchmarks/heads.py, 2,000 training rows).
AUTO_EARLY_STOPPING_ROWS = 10_000


def early_stopping_split(y: np.ndarray, fraction, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(train rows, validation rows) for early stopping; no validation when the data are too small.

    ``fraction='auto'`` holds out 10% when there are at least ``AUTO_EARLY_STOPPING_ROWS`` rows.
    """
    n = len(y)
    if isinstance(fraction, str) and fraction == "auto":
        fraction = 0.1 if n >= AUTO_EARLY_STOPPING_ROWS else None
    idx = np.arange(n)
    n_classes = len(np.unique(y))
    if not fraction or int(n * fraction) < max(2, n_classes) or n - int(n * fraction) < 2:
        return idx, None
    tr, va = stratified_holdout(y, fraction, seed)
    if len(np.unique(y[tr])) < n_classes:
        return idx, None
    return tr, va


def auto_epochs(n_rows: int, batch_size: int, *, steps: int = 3000, lo: int = 10, hi: int = 100) -> int:
    """Epochs for about ``steps`` optimiser steps, within [lo, hi]: many passes over small sets,
    few over large ones (a linear head on 50k rows converges in ~20 epochs)."""
    return int(min(hi, max(lo, math.ceil(steps / max(1, math.ceil(n_rows / batch_size))))))


def class_weights(class_weight, y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Loss weight per class index for ``class_weight`` (None, 'balanced' or {class label: weight})."""
    n_classes = len(classes)
    if class_weight is None:
        return np.ones(n_classes, np.float32)
    if isinstance(class_weight, dict):
        return np.asarray([float(class_weight.get(c, 1.0)) for c in classes], np.float32)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return w.astype(np.float32)



def _check_class_weight(class_weight) -> None:
    if not (class_weight is None or class_weight == "balanced" or isinstance(class_weight, dict)):
        raise ValueError(f"class_weight must be None, 'balanced' or a dict {{class: weight}}, got {class_weight!r}")


class TorchHead(ClassifierMixin, BaseEstimator):
    """fit/predict plumbing shared by the torch heads; subclasses implement ``_fit``, ``_logits`` and
    ``state_tensors`` / ``_load_state`` (plain tensors, so head folders load without pickle)."""
    def _validate(self) -> None:
        """Check the parameters (scikit-learn's rule: in fit, not in __init__); raise ValueError."""
        _check_class_weight(self.class_weight)

    def _validate_training(self) -> None:
        """Checks of the minibatch-training parameters shared by the torch linear head and the MLP."""
        for name in ("max_epochs", "batch_size", "patience"):
            v = getattr(self, name)
            if name == "max_epochs" and v is None:
                continue
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        vf = self.validation_fraction
        if not (vf is None or (isinstance(vf, str) and vf == "auto") or (isinstance(vf, (int, float)) and 0 <= vf < 1)):
            raise ValueError(f"validation_fraction must be 'auto', None or in [0, 1), got {vf!r}")
        _check_class_weight(self.class_weight)

    def _prepare(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self._validate()
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 classes in y; got 1 class: {self.classes_[0]!r}")
        return X, y_idx.astype(np.int64)

    def fit(self, X, y):
        X, y_idx = self._prepare(X, y)
        self._fit(X, y_idx)
        return self

    def fit_rows(self, rows, classes: np.ndarray, n_features: int):
        """Fit on :class:`~featx.heads._rows.Rows` (``rows.y``: indices into ``classes``), e.g. streamed from a store
        larger than memory. Only the heads that train on minibatches (``streams = True``) can."""
        if not self.streams:
            raise ValueError(f"{type(self).__name__} needs its training rows in memory")
        self._validate()
        self.classes_, self.n_features_in_ = np.asarray(classes), int(n_features)
        self._fit(rows, rows.y)
        return self

    streams = True  # trains on minibatches, so it can learn from rows streamed from disk

    def _checked_logits(self, X) -> np.ndarray:
        """Logits [n, n_classes], in float64 on the CPU so results do not depend on batching."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self._logits(X)

    def decision_function(self, X) -> np.ndarray:
        """Logits [n, n_classes]; for two classes, as scikit-learn, the margin [n] of ``classes_[1]``."""
        z = self._checked_logits(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    _has_proba = True  # False for heads whose scores are not probabilities (predict_proba is then absent)

    @available_if(lambda est: est._has_proba)
    def predict_proba(self, X) -> np.ndarray:
        return softmax(self._checked_logits(X))

    def predict(self, X) -> np.ndarray:
        z = self._checked_logits(X)
        return self.classes_[z.argmax(axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags

    def learned_extra(self) -> dict:
        """Learned values other than tensors, saved in the head folder's sidecar."""
        return {"n_epochs": self.n_epochs_, "validation_score": self.validation_score_}

    def load_state_tensors(self, state: dict, classes: np.ndarray, extra: dict) -> None:
        """Restore a fitted head from ``state_tensors()``, its classes and ``learned_extra()``."""
        self._load_state(state)
        self.classes_ = classes
        self.n_epochs_ = int(extra.get("n_epochs", 0))
        self.validation_score_ = float(extra.get("validation_score", float("nan")))


class LinearWeights:
    """``coef_`` [K, D] and ``intercept_`` [K] of a linear head: its logits, and its state as plain tensors (head folders)."""

    def _logits(self, X: np.ndarray) -> np.ndarray:
        return X @ self.coef_.T.astype(np.float64) + self.intercept_.astype(np.float64)

    def state_tensors(self) -> dict:
        import torch

        check_is_fitted(self)
        return {"coef": torch.from_numpy(self.coef_), "intercept": torch.from_numpy(self.intercept_)}

    def _load_state(self, state: dict) -> None:
        self.coef_ = state["coef"].numpy()
        self.intercept_ = state["intercept"].numpy()
        self.n_features_in_ = self.coef_.shape[1]

