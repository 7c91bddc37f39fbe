"""A fitted linear head, preprocessing included, as one affine map ``logits = x @ W.T + b`` on raw features.

Fine-tuning starts its classifier from it (:func:`heads_linear_map`); standardising and PCA fold into the weights.
``featx export`` builds its network from :func:`heads_score_map` (the scores ``featx predict`` prints, nearest
class mean included, with the L2 normalisations that cannot fold kept in front) and :func:`fold_affine_steps`.
"""

from __future__ import annotations

import numpy as np

from ..errors import FeatxError

__all__ = ["heads_linear_map", "heads_score_map", "fold_affine_steps", "NORMALISERS"]

# Preprocessing steps that are not affine but cheap to compute in a network: kept in front of the folded map.
NORMALISERS = ("Normalizer", "TapNormalizer")


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


def fold_affine_steps(transforms: list, W: np.ndarray, b: np.ndarray) -> tuple[list, np.ndarray, np.ndarray]:
    """(leading steps that do not fold, W', b'): the trailing standardising / PCA steps folded into ``x @ W.T + b``."""
    k = len(transforms)
    while k and type(transforms[k - 1]).__name__ in ("StandardScaler", "PCA"):
        A, c = _affine(transforms[k - 1], W.shape[1])
        W, b = W @ A, W @ c + b
        k -= 1
    return list(transforms[:k]), W, b


def heads_score_map(head) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """(normalising steps, W [K, D], b [K], class labels [K]) with ``softmax(normalise(x) @ W.T + b)`` equal to the
    class scores featx reports: ``predict_proba`` where the head has it, else the softmax of its decision function
    (two classes: of ``(-d, d)``). Raises :class:`FeatxError` for heads that are not linear in the features."""
    steps = [s for _, s in head.steps] if hasattr(head, "steps") else [head]
    *transforms, final = steps
    classes = np.asarray(getattr(final, "classes_", []))
    if type(final).__name__ == "NearestCentroid":
        W, b = _centroid_scores(final)
    elif hasattr(final, "coef_") and hasattr(final, "intercept_"):
        W = np.atleast_2d(np.asarray(final.coef_, dtype=np.float64))
        b = np.atleast_1d(np.asarray(final.intercept_, dtype=np.float64))
        if W.shape[0] == 1 and len(classes) == 2:  # probabilities: sigmoid(s) = softmax(-s/2, s/2); else softmax(-d, d)
            half = 0.5 if hasattr(final, "predict_proba") else 1.0
            W, b = np.concatenate([-W * half, W * half]), np.concatenate([-b * half, b * half])
    else:
        raise FeatxError(f"'{type(final).__name__}' is not linear in the features")
    prefix, W, b = fold_affine_steps(transforms, W, b)
    for t in prefix:
        if type(t).__name__ not in NORMALISERS or getattr(t, "norm", "l2") != "l2":
            raise FeatxError(f"a '{type(t).__name__}' step cannot be folded or computed in a network")
    return prefix, W, b, classes


def _centroid_scores(ncm) -> tuple[np.ndarray, np.ndarray]:
    """Nearest class mean as a linear map: its scores ``-|(x - c_k) / s|^2 + 2 log prior_k`` less ``-|x / s|^2``, which
    is the same for every class (so the softmax, scikit-learn's ``predict_proba``, is unchanged)."""
    if ncm.metric != "euclidean":
        raise FeatxError(f"nearest class mean with metric '{ncm.metric}' is not linear in the features")
    s = np.asarray(ncm.within_class_std_dev_, dtype=np.float64)
    s = np.where(s != 0, s, 1.0)
    c = np.asarray(ncm.centroids_, dtype=np.float64) / s
    return 2 * c / s, -(c**2).sum(axis=1) + 2 * np.log(np.asarray(ncm.class_prior_, dtype=np.float64))
