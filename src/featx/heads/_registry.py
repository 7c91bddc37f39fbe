"""The heads the command line knows: name, estimator, default preprocessing, sweep grid.

Importing this module costs no torch or scikit-learn import: estimators are built on demand,
so the command line can list heads in ``--help`` at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import FeatxError

__all__ = ["HeadSpec", "HEADS", "TORCH_HEADS", "check_head_name", "make_head", "grid_of", "predict_scores", "full_scores", "is_torch_head",
           "torch_head_class"]

# Estimator class names of featx's own heads, computed in torch and stored as plain tensors (not joblib) -> defining module.
TORCH_HEADS = {"TorchLinearClassifier": "_torch_linear", "MLPClassifier": "_mlp", "LogisticRegressionClassifier": "_logreg",
               "RidgeClassifier": "_ridge", "KNNClassifier": "_knn"}


@dataclass(frozen=True)
class HeadSpec:
    """A head as the command line names it: its estimator, default preprocessing and sweep grid."""

    name: str  # command-line name
    build: Callable[[int, str], object]  # (random_state, device) -> unfitted scikit-learn estimator
    grid: dict[str, tuple]  # parameters of the head swept by --sweep (product of the values)
    standardize: bool  # default: standardise features first
    l2_normalize: bool  # default: L2-normalise features first
    description: str


def torch_head_class(name: str):
    """The torch head class called ``name`` (a key of :data:`TORCH_HEADS`)."""
    import importlib

    return getattr(importlib.import_module(f".{TORCH_HEADS[name]}", __package__), name)


def is_torch_head(estimator) -> bool:
    return type(estimator).__name__ in TORCH_HEADS and isinstance(estimator, torch_head_class(type(estimator).__name__))


def _logreg(seed, dev):
    return torch_head_class("LogisticRegressionClassifier")(device=dev, random_state=seed)


def _linear_svm(seed, dev):
    # dual coordinate descent: on standardised embeddings with more rows than dimensions the primal
    # solver (what dual='auto' picks) took 143 s at C=0.1 on 2000 x 1280 features, the dual 5-10 s
    from sklearn.svm import LinearSVC

    return LinearSVC(C=0.01, dual=True, max_iter=5000, random_state=seed)


def _knn(seed, dev):
    return torch_head_class("KNNClassifier")(device=dev, random_state=seed)


def _ridge(seed, dev):
    return torch_head_class("RidgeClassifier")(device=dev, random_state=seed)


def _ncm(seed, dev):
    from sklearn.neighbors import NearestCentroid

    return NearestCentroid()


def _rbf_svm(seed, dev):
    from sklearn.svm import SVC

    return SVC(kernel="rbf", C=1.0, random_state=seed)


def _torch_linear(seed, dev):
    return torch_head_class("TorchLinearClassifier")(device=dev, random_state=seed)


def _mlp(seed, dev):
    return torch_head_class("MLPClassifier")(device=dev, random_state=seed)


def _logspace(lo: int, hi: int, per_decade: int = 1) -> tuple[float, ...]:
    return tuple(float(f"{v:.3g}") for v in np.logspace(lo, hi, (hi - lo) * per_decade + 1))


HEADS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in [
        HeadSpec("logreg", _logreg, {"C": _logspace(-5, 3, 2)}, True, False,
                 "multinomial logistic regression (scikit-learn's objective; the C grid solved at once by batched L-BFGS; "
                 "solver=sklearn available)"),
        HeadSpec("linear-svm", _linear_svm, {"C": _logspace(-5, 0)}, True, False, "linear SVM (one-vs-rest, squared hinge)"),
        HeadSpec("knn", _knn, {"n_neighbors": (1, 3, 5, 10, 20, 50, 100)}, False, False,
                 "k nearest neighbours (cosine; every k from one neighbour search; metric=euclidean, weights=temperature available)"),
        HeadSpec("ridge", _ridge, {"alpha": _logspace(-2, 6, 2)}, True, False,
                 "ridge classifier (least squares on +-1 targets; alpha by leave-one-out unless given; every alpha from one "
                 "factorisation)"),
        HeadSpec("ncm", _ncm, {}, False, True, "nearest class mean (on L2-normalised features)"),
        HeadSpec("rbf-svm", _rbf_svm, {"C": (0.1, 1.0, 10.0, 100.0)}, True, False, "RBF-kernel SVM (for small sets: cost grows with n^2)"),
        # decoupled weight decay as strong as 10-30 plays the role of logreg's small C (strong L2):
        # on 10,000 CIFAR-10 Lite0 embeddings, wd 0.1 reached 0.7615, wd 10 0.7755 (logreg, C=0.001: 0.780)
        HeadSpec("torch-linear", _torch_linear, {"lr": (1e-3, 3e-3, 1e-2), "weight_decay": (0.0, 1e-2, 1e-1, 1.0, 3.0, 10.0, 30.0)},
                 True, False, "softmax regression in torch (AdamW, cosine schedule, early stopping)"),
        # weight decay 1e-2..30 and dropout 0.1/0.5 all scored 0.730-0.736 on 2,000 CIFAR-10 Lite0 rows: the learning rate
        # is the one knob worth sweeping, over few values
        HeadSpec("mlp", _mlp, {"lr": (3e-4, 1e-3, 3e-3)}, True, False, "one-hidden-layer MLP in torch (at most 30 epochs)"),
    ]
}


def _unknown_head(name: str) -> FeatxError:
    return FeatxError(f"unknown head '{name}'; choose one of: {', '.join(HEADS)}")


def check_head_name(name: str) -> None:
    """Raise :class:`FeatxError` listing the heads when ``name`` is not one of them."""
    if name not in HEADS:
        raise _unknown_head(name)


def make_head(name: str, *, standardize: bool | None = None, l2_normalize: bool | None = None, pca: int | None = None,
              params: dict | None = None, random_state: int = 0, device: str = "auto", tap_blocks: list | None = None):
    """The head ``name`` as a Pipeline: [taps] -> [l2] -> [standardize] -> [pca] -> head.

    ``None`` for a preprocessing flag keeps the head's default; ``params`` set parameters of the
    head step (e.g. ``{'C': 0.1}``, ``{'metric': 'euclidean'}``). ``tap_blocks`` ([(start, stop)] per tap of a
    multi-tap embedding) adds per-tap L2 normalisation first.
    """
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    spec = HEADS.get(name)
    if spec is None:
        raise _unknown_head(name)
    head = spec.build(random_state, device)
    if params:
        valid = head.get_params()
        bad = [k for k in params if k not in valid]
        if bad:
            raise FeatxError(f"head '{name}' has no parameter {', '.join(bad)}; it has: {', '.join(sorted(valid))}")
        head.set_params(**params)
    steps = []
    if tap_blocks:
        from ._taps import TapNormalizer

        steps.append(("taps", TapNormalizer(tuple(tuple(b) for b in tap_blocks))))
    if spec.l2_normalize if l2_normalize is None else l2_normalize:
        steps.append(("l2", Normalizer()))
    if spec.standardize if standardize is None else standardize:
        steps.append(("standardize", StandardScaler()))
    if pca:
        steps.append(("pca", PCA(n_components=int(pca), random_state=random_state)))
    steps.append(("head", head))
    return Pipeline(steps)


def grid_of(name: str, grid: dict[str, tuple] | None = None) -> list[dict]:
    """The sweep grid of head ``name`` as a list of parameter dicts (product of the values)."""
    from itertools import product

    if name not in HEADS:
        raise _unknown_head(name)
    grid = HEADS[name].grid if grid is None else grid
    keys = list(grid)
    return [dict(zip(keys, values)) for values in product(*(grid[k] for k in keys))]


def predict_scores(estimator, X) -> np.ndarray:
    """Class probabilities [n, n_classes_seen]: ``predict_proba`` when the head has it, else the
    softmax of its decision function (an uncalibrated confidence, for ranking and top-k)."""
    from ..metrics import softmax  # here: the registry is read by the command line, which loads no scikit-learn

    if hasattr(estimator, "predict_proba"):
        try:
            return estimator.predict_proba(X)
        except ValueError:  # undefined (a nearest-centroid head on one image per class has no spread): the prediction alone
            predicted = np.asarray(estimator.predict(X))
            return (predicted[:, None] == np.asarray(estimator.classes_)[None, :]).astype(np.float64)
    d = np.asarray(estimator.decision_function(X), dtype=np.float64)
    return softmax(np.stack([-d, d], axis=1) if d.ndim == 1 else d)


def full_scores(estimator, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Scores [n, n_classes] in class-index order (classes unseen in training get 0)."""
    p = predict_scores(estimator, X)
    out = np.zeros((len(X), n_classes), dtype=np.float64)
    out[:, np.asarray(estimator.classes_, dtype=np.int64)] = p
    return out
