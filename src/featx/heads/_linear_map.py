"""A fitted linear head, preprocessing included, as one affine map ``logits = x @ W.T + b`` on raw features.

Fine-tuning starts its classifier from it; standardising and PCA fold into the weights.
"""

from __future__ import annotations

import numpy as np

from ..errors import FeatxError

__all__ = ["heads_linear_map"]


def heads_linear_map(head) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W [K, D], b [K], class labels [K]) with ``logits = x @ W.T + b`` on raw features."""
    steps = [s for _, s in head.steps] if hasattr(head, "steps") else [head]
    *transforms, final = steps
    if hasattr(final, "coef_") and hasattr(final, "intercept_"):  # scikit-learn linear models and featx's torch-linear
        W = np.atleast_2d(np.asarray(final.coef_, dtype=np.float64))
        b = np.atleast_1d(np.asarray(final.intercept_, dtype=np.float64))
    else:
        raise FeatxError(f"--init-head needs a linear head (logreg, linear-svm, ridge or torch-linear); "
                         f"'{type(final).__name__}' is not linear in the features")
    classes = np.asarray(getattr(final, "classes_", np.arange(max(2, W.shape[0]))))
    if W.shape[0] == 1 and len(classes) == 2:  # binary: one score s -> logits (-s/2, s/2), same softmax as sigmoid(s)
        W, b = np.concatenate([-W / 2, W / 2]), np.concatenate([-b / 2, b / 2])
    # fold preprocessing, last step first: W x' + b with x' = A x + c  ->  (W A) x + (W c + b)
    for t in reversed(transforms):
        A, c = _affine(t, W.shape[1])
        W, b = W @ A, W @ c + b
    return W, b, classes


def _affine(t, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``t.transform(x) == A @ x + c`` for linear scikit-learn transformers."""
    name = type(t).__name__
    if t is None or t == "passthrough":
        return np.eye(dim), np.zeros(dim)
    if name == "StandardScaler":
        n = int(t.n_features_in_)
        scale = np.asarray(t.scale_, dtype=np.float64) if t.scale_ is not None else np.ones(n)
        mean = np.asarray(t.mean_, dtype=np.float64) if t.mean_ is not None and t.with_mean else np.zeros(n)
        return np.diag(1.0 / scale), -mean / scale
    if name == "PCA":
        comp = np.asarray(t.components_, dtype=np.float64)
        if t.whiten:
            comp = comp / np.sqrt(np.asarray(t.explained_variance_, dtype=np.float64))[:, None]
        return comp, -comp @ np.asarray(t.mean_, dtype=np.float64)
    raise FeatxError(f"--init-head cannot fold a '{name}' step into a linear classifier (only standardising and PCA are linear); "
                     "fit the head without it")
