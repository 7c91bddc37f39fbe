"""Classification heads on cached embeddings, all of them scikit-learn estimators.

The scikit-learn heads are stock estimators behind optional preprocessing steps (standardise,
L2-normalise, PCA) in a :class:`~sklearn.pipeline.Pipeline`. The torch heads
(:class:`TorchLinearClassifier`, :class:`MLPClassifier`) follow the same contract: ``__init__``
stores its arguments, ``fit`` validates and learns, learned state ends in ``_``.

:func:`sweep` picks the regularisation on a stratified validation split carved from the
training data and refits on all of it. For the torch linear head the whole grid of learning
rates and weight decays is trained in one batched pass (one matmul for all heads), as
DINOv2's linear evaluation does; each head follows exactly the update it would follow alone.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from itertools import product
from typing import Callable

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .errors import FeatxError

__all__ = [
    "HEADS", "HeadSpec", "make_head", "grid_of", "sweep", "SweepResult", "predict_scores",
    "TorchLinearClassifier", "MLPClassifier", "train_linear_heads",
]

_logger = logging.getLogger(__name__)


# -- torch heads -------------------------------------------------------------------------------
def _resolve_device(device: str) -> torch.device:
    from .extract import resolve_device

    return resolve_device(device)


# With fewer rows, a 10% validation split is too small to judge an epoch by (accuracy moves in
# steps of 1/160 at 1,600 rows) and stopping early cost 3.5 accuracy points on CIFAR-10 features
# against running the whole cosine schedule (benchmarks/heads.py, 2,000 training rows).
AUTO_EARLY_STOPPING_ROWS = 10_000


def _early_stopping_split(y: np.ndarray, fraction, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
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
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    tr, va = train_test_split(idx, test_size=fraction, random_state=seed, stratify=stratify)
    if len(np.unique(y[tr])) < n_classes:
        return idx, None
    return np.sort(tr), np.sort(va)


def auto_epochs(n_rows: int, batch_size: int, *, steps: int = 3000, lo: int = 10, hi: int = 100) -> int:
    """Epochs for about ``steps`` optimiser steps, within [lo, hi]: many passes over small sets,
    few over large ones (a linear head on 50k rows converges in ~20 epochs)."""
    return int(min(hi, max(lo, math.ceil(steps / max(1, math.ceil(n_rows / batch_size))))))


def _class_weights(class_weight, y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Loss weight per class index for ``class_weight`` (None, 'balanced' or {class label: weight})."""
    n_classes = len(classes)
    if class_weight is None:
        return np.ones(n_classes, np.float32)
    if isinstance(class_weight, dict):
        return np.asarray([float(class_weight.get(c, 1.0)) for c in classes], np.float32)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return w.astype(np.float32)


@dataclass
class LinearHeads:
    """Weights of H linear heads trained together, and how each fared on its validation rows."""

    weight: np.ndarray  # [H, D, C]
    bias: np.ndarray  # [H, C]
    val_accuracy: np.ndarray  # [H] early-stopping validation accuracy at the kept epoch (nan: no validation)
    epochs: np.ndarray  # [H] epochs trained before the head stopped


def train_linear_heads(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    lrs: list[float],
    weight_decays: list[float],
    max_epochs: int | None = None,
    batch_size: int = 256,
    patience: int = 20,
    validation_fraction: float | str | None = "auto",
    class_weight: str | None = None,
    device: str = "auto",
    random_state: int = 0,
    classes: np.ndarray | None = None,
) -> LinearHeads:
    """Train ``len(lrs)`` softmax heads (head h: ``lrs[h]``, ``weight_decays[h]``) in one pass.

    All heads see the same minibatches; logits of every head come from one matmul
    ``x @ W.view(D, H * C)``. The optimiser is AdamW with a per-step cosine schedule, written out
    so learning rate and weight decay can differ per head; head h's update never depends on the
    others, so training H heads together equals training each alone. Each head stops on its own
    when its validation accuracy has not improved for ``patience`` epochs; its best epoch is kept.
    """
    assert len(lrs) == len(weight_decays) and len(lrs) > 0
    dev = _resolve_device(device)
    H, (n, D), C = len(lrs), X.shape, n_classes
    tr, va = _early_stopping_split(y, validation_fraction, random_state)
    gen = torch.Generator().manual_seed(random_state)
    Xt = torch.as_tensor(np.ascontiguousarray(X[tr], dtype=np.float32), device=dev)
    yt = torch.as_tensor(y[tr], dtype=torch.long, device=dev)
    cw = torch.as_tensor(_class_weights(class_weight, y[tr], np.asarray(classes) if classes is not None else np.arange(C)), device=dev)
    if va is not None:
        Xv = torch.as_tensor(np.ascontiguousarray(X[va], dtype=np.float32), device=dev)
        yv = torch.as_tensor(y[va], dtype=torch.long, device=dev)
    W = torch.zeros(D, H, C, device=dev)
    b = torch.zeros(H, C, device=dev)
    mW, vW, mb, vb = torch.zeros_like(W), torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(b)
    lr0 = torch.as_tensor(lrs, dtype=torch.float32, device=dev)
    wd = torch.as_tensor(weight_decays, dtype=torch.float32, device=dev)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    n_tr = len(tr)
    steps_per_epoch = math.ceil(n_tr / batch_size)
    max_epochs = auto_epochs(n_tr, batch_size) if max_epochs is None else max_epochs
    total = max(1, max_epochs * steps_per_epoch)
    active = torch.ones(H, dtype=torch.bool, device=dev)
    best_W, best_b = W.clone(), b.clone()
    best_acc = torch.full((H,), -1.0, device=dev)
    best_loss = torch.full((H,), float("inf"), device=dev)
    since_best = torch.zeros(H, dtype=torch.long, device=dev)
    epochs = torch.zeros(H, dtype=torch.long, device=dev)
    step = 0
    with torch.no_grad():
        for _epoch in range(max_epochs):
            perm = torch.randperm(n_tr, generator=gen).to(dev)
            for s in range(0, n_tr, batch_size):
                bi = perm[s : s + batch_size]
                xb, yb = Xt[bi], yt[bi]
                logits = (xb @ W.view(D, H * C)).view(-1, H, C) + b
                g = torch.softmax(logits, dim=2)
                g[torch.arange(len(yb), device=dev), :, yb] -= 1.0
                sw = cw[yb]
                g *= (sw / sw.sum()).view(-1, 1, 1)
                gW = (xb.T @ g.view(-1, H * C)).view(D, H, C)
                gb = g.sum(0)
                step += 1
                lr = lr0 * (0.5 * (1.0 + math.cos(math.pi * (step - 1) / total))) * active
                c1, c2 = 1 - beta1**step, 1 - beta2**step
                mW.mul_(beta1).add_(gW, alpha=1 - beta1)
                vW.mul_(beta2).addcmul_(gW, gW, value=1 - beta2)
                mb.mul_(beta1).add_(gb, alpha=1 - beta1)
                vb.mul_(beta2).addcmul_(gb, gb, value=1 - beta2)
                W.mul_(1 - (lr * wd).view(1, H, 1))
                W.sub_(lr.view(1, H, 1) * (mW / c1) / ((vW / c2).sqrt() + eps))
                b.sub_(lr.view(H, 1) * (mb / c1) / ((vb / c2).sqrt() + eps))
            epochs += active.long()
            if va is None:
                continue
            acc, loss = _evaluate_heads(Xv, yv, W, b)
            better = active & ((acc > best_acc) | ((acc == best_acc) & (loss < best_loss)))
            best_W = torch.where(better.view(1, H, 1), W, best_W)
            best_b = torch.where(better.view(H, 1), b, best_b)
            best_acc = torch.where(better, acc, best_acc)
            best_loss = torch.where(better, loss, best_loss)
            since_best = torch.where(better, torch.zeros_like(since_best), since_best + 1)
            active &= since_best < patience
            if not bool(active.any()):
                break
    if va is None:
        best_W, best_b = W, b
        val_acc = np.full(H, np.nan)
    else:
        val_acc = best_acc.cpu().numpy().astype(np.float64)
    return LinearHeads(
        weight=best_W.permute(1, 0, 2).cpu().numpy().copy(),
        bias=best_b.cpu().numpy().copy(),
        val_accuracy=val_acc,
        epochs=epochs.cpu().numpy(),
    )


def _evaluate_heads(X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor, chunk: int = 8192):
    """Accuracy [H] and mean cross-entropy [H] of every head on (X, y)."""
    D, H, C = W.shape
    correct = torch.zeros(H, device=X.device)
    loss = torch.zeros(H, device=X.device)
    for s in range(0, len(X), chunk):
        logits = (X[s : s + chunk] @ W.view(D, H * C)).view(-1, H, C) + b
        yc = y[s : s + chunk]
        correct += (logits.argmax(2) == yc.view(-1, 1)).float().sum(0)
        loss += torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), yc.view(-1, 1).expand(-1, H), reduction="none").sum(0)
    return correct / len(X), loss / len(X)


class _TorchHead(ClassifierMixin, BaseEstimator):
    """fit/predict plumbing shared by the torch heads; subclasses implement ``_fit`` and ``_logits``."""

    def _validate_common(self) -> None:
        for name in ("max_epochs", "batch_size", "patience"):
            v = getattr(self, name)
            if name == "max_epochs" and v is None:
                continue
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr",):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        vf = self.validation_fraction
        if not (vf is None or (isinstance(vf, str) and vf == "auto") or (isinstance(vf, (int, float)) and 0 <= vf < 1)):
            raise ValueError(f"validation_fraction must be 'auto', None or in [0, 1), got {vf!r}")
        if not (self.class_weight is None or self.class_weight == "balanced" or isinstance(self.class_weight, dict)):
            raise ValueError(f"class_weight must be None, 'balanced' or a dict {{class: weight}}, got {self.class_weight!r}")

    def _prepare(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self._validate_common()
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 classes in y; got 1 class: {self.classes_[0]!r}")
        return X, y_idx.astype(np.int64)

    def fit(self, X, y):
        X, y_idx = self._prepare(X, y)
        self._fit(X, y_idx)
        return self

    def _checked_logits(self, X) -> np.ndarray:
        """Logits [n, n_classes], in float64 on the CPU so results do not depend on batching."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self._logits(X)

    def decision_function(self, X) -> np.ndarray:
        """Logits [n, n_classes]; for two classes, as scikit-learn, the margin [n] of ``classes_[1]``."""
        z = self._checked_logits(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_proba(self, X) -> np.ndarray:
        z = self._checked_logits(X)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        z = self._checked_logits(X)
        return self.classes_[z.argmax(axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags


class TorchLinearClassifier(_TorchHead):
    """Softmax regression trained with AdamW, a cosine schedule and early stopping, in torch.

    Parameters
    ----------
    lr, weight_decay : AdamW learning rate and (decoupled) weight decay.
    max_epochs, batch_size : training length (None: about 3000 steps, 10 to 100 epochs) and minibatch size.
    patience : epochs without validation improvement before stopping.
    validation_fraction : share of the training rows held out (stratified) for early stopping;
        'auto' (default) holds out 10% from 10,000 training rows up and trains the whole schedule
        below that; None or 0 trains on all rows for ``max_epochs``.
    class_weight : None, 'balanced' (loss weights inversely proportional to class frequency) or
        a dict {class label: weight}.
    device : 'auto' (CUDA when present), 'cpu' or 'cuda[:N]'.
    random_state : seed of the validation split and the minibatch order.
    """

    def __init__(self, *, lr: float = 1e-2, weight_decay: float = 1e-4, max_epochs: int | None = None, batch_size: int = 256,
                 patience: int = 20, validation_fraction: float | str | None = "auto", class_weight: str | None = None,
                 device: str = "auto", random_state: int = 0):
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.class_weight = class_weight
        self.device = device
        self.random_state = random_state

    def _train_kwargs(self) -> dict:
        return dict(max_epochs=self.max_epochs, batch_size=self.batch_size, patience=self.patience,
                    validation_fraction=self.validation_fraction, class_weight=self.class_weight,
                    device=self.device, random_state=self.random_state, classes=self.classes_)

    def _fit(self, X, y_idx) -> None:
        heads = train_linear_heads(X, y_idx, len(self.classes_), lrs=[self.lr], weight_decays=[self.weight_decay], **self._train_kwargs())
        self._set_learned(heads, 0)

    def _set_learned(self, heads: LinearHeads, h: int) -> None:
        self.coef_ = heads.weight[h].T.astype(np.float32)  # [C, D], as scikit-learn's linear models
        self.intercept_ = heads.bias[h].astype(np.float32)
        self.n_epochs_ = int(heads.epochs[h])
        self.validation_score_ = float(heads.val_accuracy[h])

    def fit_grid(self, X, y, grid: list[dict]) -> list["TorchLinearClassifier"]:
        """Fit one clone per entry of ``grid`` (dicts of ``lr`` / ``weight_decay``) in one batched pass.

        Returns the fitted clones, each identical (up to float rounding) to
        ``clone(self).set_params(**entry).fit(X, y)``.
        """
        bad = [k for entry in grid for k in entry if k not in ("lr", "weight_decay")]
        if bad:
            raise ValueError(f"fit_grid varies only lr and weight_decay, not {sorted(set(bad))}")
        X, y_idx = self._prepare(X, y)
        heads_est = [clone(self).set_params(**entry) for entry in grid]
        for est in heads_est:
            est._validate_common()
        heads = train_linear_heads(X, y_idx, len(self.classes_), lrs=[e.lr for e in heads_est],
                                   weight_decays=[e.weight_decay for e in heads_est], **self._train_kwargs())
        for h, est in enumerate(heads_est):
            est.classes_ = self.classes_
            est.n_features_in_ = self.n_features_in_
            if hasattr(self, "feature_names_in_"):
                est.feature_names_in_ = self.feature_names_in_
            est._set_learned(heads, h)
        return heads_est

    def _logits(self, X: np.ndarray) -> np.ndarray:
        return X @ self.coef_.T.astype(np.float64) + self.intercept_.astype(np.float64)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        check_is_fitted(self)
        return {"coef": torch.from_numpy(self.coef_), "intercept": torch.from_numpy(self.intercept_)}

    def load_state_tensors(self, state: dict[str, torch.Tensor], classes: np.ndarray, extra: dict) -> None:
        self.coef_ = state["coef"].numpy()
        self.intercept_ = state["intercept"].numpy()
        self.classes_ = classes
        self.n_features_in_ = self.coef_.shape[1]
        self.n_epochs_ = int(extra.get("n_epochs", 0))
        self.validation_score_ = float(extra.get("validation_score", float("nan")))

    def learned_extra(self) -> dict:
        return {"n_epochs": self.n_epochs_, "validation_score": self.validation_score_}


class _MLP(torch.nn.Sequential):
    def __init__(self, d_in: int, hidden: int, n_out: int, dropout: float):
        super().__init__(torch.nn.Linear(d_in, hidden), torch.nn.GELU(), torch.nn.Dropout(dropout), torch.nn.Linear(hidden, n_out))


class MLPClassifier(_TorchHead):
    """One-hidden-layer MLP (Linear, GELU, Dropout, Linear) trained like :class:`TorchLinearClassifier`.

    ``hidden_dim`` and ``dropout`` set the hidden layer; the other parameters are those of
    :class:`TorchLinearClassifier`.
    """

    def __init__(self, *, hidden_dim: int = 512, dropout: float = 0.1, lr: float = 1e-3, weight_decay: float = 1e-2,
                 max_epochs: int | None = None, batch_size: int = 256, patience: int = 10, validation_fraction: float | str | None = "auto",
                 class_weight: str | None = None, device: str = "auto", random_state: int = 0):
        self.hidden_dim = hidden_dim
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.class_weight = class_weight
        self.device = device
        self.random_state = random_state

    def _fit(self, X, y_idx) -> None:
        if not isinstance(self.hidden_dim, (int, np.integer)) or self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive integer, got {self.hidden_dim!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        dev = _resolve_device(self.device)
        C = len(self.classes_)
        tr, va = _early_stopping_split(y_idx, self.validation_fraction, self.random_state)
        devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.random_state)
            gen = torch.Generator().manual_seed(self.random_state)
            net = _MLP(X.shape[1], int(self.hidden_dim), C, float(self.dropout)).to(dev)
            Xt, yt = torch.as_tensor(X[tr], device=dev), torch.as_tensor(y_idx[tr], device=dev)
            cw = torch.as_tensor(_class_weights(self.class_weight, y_idx[tr], self.classes_), device=dev)
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            max_epochs = auto_epochs(len(tr), self.batch_size) if self.max_epochs is None else self.max_epochs
            steps = max(1, max_epochs * math.ceil(len(tr) / self.batch_size))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
            best = (-1.0, float("inf"))
            best_state, since, epochs = None, 0, 0
            for _epoch in range(max_epochs):
                net.train()
                perm = torch.randperm(len(tr), generator=gen).to(dev)
                for s in range(0, len(tr), self.batch_size):
                    bi = perm[s : s + self.batch_size]
                    loss = torch.nn.functional.cross_entropy(net(Xt[bi]), yt[bi], weight=cw)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                epochs += 1
                if va is None:
                    continue
                net.eval()
                with torch.inference_mode():
                    logits = net(torch.as_tensor(X[va], device=dev))
                    yv = torch.as_tensor(y_idx[va], device=dev)
                    score = (float((logits.argmax(1) == yv).float().mean()), float(torch.nn.functional.cross_entropy(logits, yv)))
                if score[0] > best[0] or (score[0] == best[0] and score[1] < best[1]):
                    best, since = score, 0
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                else:
                    since += 1
                    if since >= self.patience:
                        break
        if best_state is not None:
            net.load_state_dict(best_state)
        self.module_ = net.eval().cpu().double()
        self.n_epochs_ = epochs
        self.validation_score_ = best[0] if va is not None else float("nan")

    def _logits(self, X: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module_(torch.from_numpy(np.ascontiguousarray(X))).numpy()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        check_is_fitted(self)
        return {k: v.float() for k, v in self.module_.state_dict().items()}

    def load_state_tensors(self, state: dict[str, torch.Tensor], classes: np.ndarray, extra: dict) -> None:
        d_in, n_out = state["0.weight"].shape[1], state["3.weight"].shape[0]
        net = _MLP(d_in, state["0.weight"].shape[0], n_out, float(self.dropout))
        net.load_state_dict(state)
        self.module_ = net.eval().double()
        self.classes_ = classes
        self.n_features_in_ = d_in
        self.n_epochs_ = int(extra.get("n_epochs", 0))
        self.validation_score_ = float(extra.get("validation_score", float("nan")))

    def learned_extra(self) -> dict:
        return {"n_epochs": self.n_epochs_, "validation_score": self.validation_score_}


# -- registry ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadSpec:
    """A head as the command line names it: its estimator, default preprocessing and sweep grid."""

    name: str  # command-line name
    build: Callable[[int, str], BaseEstimator]  # (random_state, device) -> unfitted estimator
    grid: dict[str, tuple]  # parameters of the head swept by --sweep (product of the values)
    standardize: bool  # default: standardise features first
    l2_normalize: bool  # default: L2-normalise features first
    description: str


_LOGSPACE_C = tuple(float(c) for c in np.logspace(-4, 2, 7))
HEADS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in [
        HeadSpec("logreg", lambda seed, dev: LogisticRegression(max_iter=1000, random_state=seed), {"C": _LOGSPACE_C},
                 True, False, "multinomial logistic regression (lbfgs)"),
        # dual coordinate descent: on standardised embeddings with more rows than dimensions the primal
        # solver (what dual='auto' picks) took 143 s at C=0.1 on 2000 x 1280 features, the dual 5-10 s
        HeadSpec("linear-svm", lambda seed, dev: LinearSVC(C=0.01, dual=True, max_iter=5000, random_state=seed),
                 {"C": tuple(float(c) for c in np.logspace(-5, 0, 6))}, True, False, "linear SVM (one-vs-rest, squared hinge)"),
        HeadSpec("knn", lambda seed, dev: KNeighborsClassifier(n_neighbors=10, metric="cosine", algorithm="brute"),
                 {"n_neighbors": (1, 3, 5, 10, 20, 50)}, False, False, "k nearest neighbours (cosine; metric=euclidean available)"),
        HeadSpec("ridge", lambda seed, dev: RidgeClassifier(alpha=1.0), {"alpha": tuple(float(a) for a in np.logspace(-2, 4, 7))},
                 True, False, "ridge classifier (least squares on +-1 targets)"),
        HeadSpec("ncm", lambda seed, dev: NearestCentroid(), {}, False, True, "nearest class mean (on L2-normalised features)"),
        HeadSpec("rbf-svm", lambda seed, dev: SVC(kernel="rbf", C=1.0, random_state=seed), {"C": (0.1, 1.0, 10.0, 100.0)},
                 True, False, "RBF-kernel SVM (for small sets: cost grows with n^2)"),
        HeadSpec("torch-linear", lambda seed, dev: TorchLinearClassifier(device=dev, random_state=seed),
                 # decoupled weight decay as strong as 10-30 plays the role of logreg's small C (strong L2):
                 # on 10,000 CIFAR-10 Lite0 embeddings, wd 0.1 reached 0.7615, wd 10 0.7755 (logreg, C=0.001: 0.780)
                 {"lr": (1e-3, 3e-3, 1e-2), "weight_decay": (0.0, 1e-2, 1e-1, 1.0, 3.0, 10.0, 30.0)}, True, False,
                 "softmax regression in torch (AdamW, cosine schedule, early stopping)"),
        HeadSpec("mlp", lambda seed, dev: MLPClassifier(device=dev, random_state=seed),
                 {"weight_decay": (1e-4, 1e-3, 1e-2, 1e-1)}, True, False, "one-hidden-layer MLP in torch"),
    ]
}


def _unknown_head(name: str) -> FeatxError:
    return FeatxError(f"unknown head '{name}'; choose one of: {', '.join(HEADS)}")


def make_head(name: str, *, standardize: bool | None = None, l2_normalize: bool | None = None, pca: int | None = None,
              params: dict | None = None, random_state: int = 0, device: str = "auto") -> Pipeline:
    """The head ``name`` as a Pipeline: [l2] -> [standardize] -> [pca] -> head.

    ``None`` for a preprocessing flag keeps the head's default; ``params`` set parameters of the
    head step (e.g. ``{'C': 0.1}``, ``{'metric': 'euclidean'}``).
    """
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
    if spec.l2_normalize if l2_normalize is None else l2_normalize:
        steps.append(("l2", Normalizer()))
    if spec.standardize if standardize is None else standardize:
        steps.append(("standardize", StandardScaler()))
    if pca:
        steps.append(("pca", PCA(n_components=int(pca), random_state=random_state)))
    steps.append(("head", head))
    return Pipeline(steps)


def predict_scores(estimator, X) -> np.ndarray:
    """Class probabilities [n, n_classes_seen]: ``predict_proba`` when the head has it, else the
    softmax of its decision function (an uncalibrated confidence, for ranking and top-k)."""
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(X)
    d = np.asarray(estimator.decision_function(X), dtype=np.float64)
    if d.ndim == 1:
        d = np.stack([-d, d], axis=1)
    d = d - d.max(axis=1, keepdims=True)
    p = np.exp(d)
    return p / p.sum(axis=1, keepdims=True)


# -- sweeps ------------------------------------------------------------------------------------
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


def grid_of(name: str, grid: dict[str, tuple] | None = None) -> list[dict]:
    """The sweep grid of head ``name`` as a list of parameter dicts (product of the values)."""
    if name not in HEADS:
        raise _unknown_head(name)
    grid = HEADS[name].grid if grid is None else grid
    keys = list(grid)
    return [dict(zip(keys, values)) for values in product(*(grid[k] for k in keys))]


def sweep(pipeline: Pipeline, X: np.ndarray, y: np.ndarray, grid: list[dict], *, val_fraction: float = 0.2,
          random_state: int = 0) -> tuple[Pipeline, SweepResult]:
    """Choose the head's parameters among ``grid`` on a stratified validation split, refit on all of (X, y).

    ``grid`` entries set parameters of the pipeline's ``head`` step. Ties go to the first entry.
    A :class:`TorchLinearClassifier` head trains its whole grid in one batched pass.
    """
    result = SweepResult(params=sorted({k for g in grid for k in g}))
    if not grid:
        return clone(pipeline).fit(X, y), result
    counts = np.unique(y, return_counts=True)[1]
    if counts.min() < 2:
        raise FeatxError("a class has a single training example, too few for a validation split; drop --sweep")
    n_val = max(int(round(len(y) * val_fraction)), len(counts))
    if len(y) - n_val < len(counts):
        raise FeatxError(f"{len(y)} training rows are too few to carve a validation split for --sweep; drop --sweep")
    idx_tr, idx_va = train_test_split(np.arange(len(y)), test_size=n_val, random_state=random_state, stratify=y)
    idx_tr, idx_va = np.sort(idx_tr), np.sort(idx_va)
    result.n_train, result.n_val = len(idx_tr), len(idx_va)
    t0 = time.perf_counter()
    head = pipeline.named_steps["head"]
    if isinstance(head, TorchLinearClassifier):
        pre = clone(pipeline[:-1]).fit(X[idx_tr], y[idx_tr]) if len(pipeline) > 1 else None
        Z_tr = pre.transform(X[idx_tr]) if pre is not None else X[idx_tr]
        Z_va = pre.transform(X[idx_va]) if pre is not None else X[idx_va]
        fitted = clone(head).fit_grid(Z_tr, y[idx_tr], grid)
        scores = [float(est.score(Z_va, y[idx_va])) for est in fitted]
        result.batched = True
    else:
        scores = []
        for entry in grid:
            est = clone(pipeline).set_params(**{f"head__{k}": v for k, v in entry.items()})
            scores.append(float(est.fit(X[idx_tr], y[idx_tr]).score(X[idx_va], y[idx_va])))
    result.seconds = time.perf_counter() - t0
    result.curve = [{"params": entry, "val_accuracy": s} for entry, s in zip(grid, scores)]
    best = int(np.argmax(scores))
    result.best, result.best_val_accuracy = dict(grid[best]), scores[best]
    _logger.debug("sweep %s: best %s (validation accuracy %.4f)", result.params, result.best, result.best_val_accuracy)
    final = clone(pipeline).set_params(**{f"head__{k}": v for k, v in result.best.items()})
    return final.fit(X, y), result
