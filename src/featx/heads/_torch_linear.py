"""Softmax regression in torch, and many of them trained together in one batched pass (DINOv2's linear eval)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import clone

from ..device import resolve_device
from ._progress import progress_bar
from ._rows import ArrayRows, Rows
from ._torch_base import LinearWeights, TorchHead, auto_epochs, class_weights, early_stopping_split

__all__ = ["LinearHeads", "train_linear_heads", "TorchLinearClassifier"]


@dataclass
class LinearHeads:
    """Weights of H linear heads trained together, and how each fared on its validation rows."""

    weight: np.ndarray  # [H, D, C]
    bias: np.ndarray  # [H, C]
    val_accuracy: np.ndarray  # [H] early-stopping validation accuracy at the kept epoch (nan: no validation)
    epochs: np.ndarray  # [H] epochs trained before the head stopped


def train_linear_heads(
    X: np.ndarray | Rows,
    y: np.ndarray | None,
    n_classes: int,
    *,
    lrs: list[float],
    weight_decays: list[float],
    l2s: list[float] | None = None,
    max_epochs: int | None = None,
    batch_size: int = 256,
    patience: int = 20,
    validation_fraction: float | str | None = "auto",
    class_weight: str | None = None,
    device: str = "auto",
    random_state: int = 0,
    classes: np.ndarray | None = None,
) -> LinearHeads:
    """Train ``len(lrs)`` softmax heads (head h: ``lrs[h]``, ``weight_decays[h]``) in one pass over the rows.

    ``X`` is an array (with labels ``y``, class indices) or :class:`Rows` (streamed from a store). All heads see the
    same minibatches; logits of every head come from one matmul ``x @ W.view(D, H * C)``. The optimiser is AdamW
    with a per-step cosine schedule, written out so learning rate and weight decay can differ per head (``l2s``
    adds a coupled L2 penalty ``l2 * ||W||^2 / 2`` to the loss instead, as logistic regression's objective has);
    head h's update never depends on the others, so training H heads together equals training each alone. Each
    head stops on its own when its validation accuracy has not improved for ``patience`` epochs; its best epoch is kept.
    """
    assert len(lrs) == len(weight_decays) and len(lrs) > 0
    dev = resolve_device(device)
    rows = X if isinstance(X, Rows) else ArrayRows(X, y)
    H, C = len(lrs), n_classes
    tr, va = early_stopping_split(rows.y, validation_fraction, random_state)
    train, val = (rows, None) if va is None else (rows.subset(tr), rows.subset(va))
    gen = torch.Generator().manual_seed(random_state)
    cw = torch.as_tensor(class_weights(class_weight, train.y, np.asarray(classes) if classes is not None else np.arange(C)), device=dev)
    D = next(train.chunks(dev))[0].shape[1]
    W, b = torch.zeros(D, H, C, device=dev), torch.zeros(H, C, device=dev)
    max_epochs = auto_epochs(len(train), batch_size) if max_epochs is None else max_epochs
    optimizer = _BatchedAdamW(W, b, lrs, weight_decays, total_steps=max(1, max_epochs * train.n_batches(batch_size)))
    l2 = None if l2s is None else torch.as_tensor(l2s, dtype=torch.float32, device=dev).view(1, H, 1)
    stopping = _EarlyStopping(W, b, patience) if val is not None else None
    active = torch.ones(H, dtype=torch.bool, device=dev)
    epochs = torch.zeros(H, dtype=torch.long, device=dev)
    with torch.no_grad(), progress_bar(max_epochs, f"linear heads ({H})", unit="epoch") as bar:
        for _epoch in range(max_epochs):
            for xb, yb in train.batches(batch_size, gen, dev):
                gW, gb = _softmax_gradients(xb, yb, W, b, cw)
                optimizer.step(gW if l2 is None else gW + l2 * W, gb, active)
            epochs += active.long()
            bar.update()
            if stopping is not None:
                active &= stopping.update(*_evaluate_heads(val, W, b, dev), W, b)
                if not bool(active.any()):
                    break
    best_W, best_b = (W, b) if stopping is None else (stopping.W, stopping.b)
    val_acc = np.full(H, np.nan) if stopping is None else stopping.acc.cpu().numpy().astype(np.float64)
    return LinearHeads(weight=best_W.permute(1, 0, 2).cpu().numpy().copy(), bias=best_b.cpu().numpy().copy(),
                       val_accuracy=val_acc, epochs=epochs.cpu().numpy())


def _softmax_gradients(xb: torch.Tensor, yb: torch.Tensor, W: torch.Tensor, b: torch.Tensor, cw: torch.Tensor):
    """Gradients (dW [D, H, C], db [H, C]) of every head's class-weighted mean cross-entropy on one minibatch."""
    D, H, C = W.shape
    logits = (xb @ W.view(D, H * C)).view(-1, H, C) + b
    g = torch.softmax(logits, dim=2)
    g[torch.arange(len(yb), device=xb.device), :, yb] -= 1.0
    sw = cw[yb]
    g *= (sw / sw.sum()).view(-1, 1, 1)
    return (xb.T @ g.view(-1, H * C)).view(D, H, C), g.sum(0)


class _BatchedAdamW:
    """AdamW over H heads at once, each with its own peak learning rate and weight decay, on a per-step cosine schedule."""

    betas, eps = (0.9, 0.999), 1e-8

    def __init__(self, W: torch.Tensor, b: torch.Tensor, lrs, weight_decays, total_steps: int):
        self.W, self.b, self.total, self.t = W, b, total_steps, 0
        self.lr0 = torch.as_tensor(lrs, dtype=torch.float32, device=W.device)
        self.wd = torch.as_tensor(weight_decays, dtype=torch.float32, device=W.device)
        self.mW, self.vW, self.mb, self.vb = torch.zeros_like(W), torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(b)

    def step(self, gW: torch.Tensor, gb: torch.Tensor, active: torch.Tensor) -> None:
        """One update; heads that stopped (``active`` False) get a zero learning rate."""
        (beta1, beta2), H = self.betas, len(self.lr0)
        self.t += 1
        lr = self.lr0 * (0.5 * (1.0 + math.cos(math.pi * (self.t - 1) / self.total))) * active
        c1, c2 = 1 - beta1**self.t, 1 - beta2**self.t
        self.mW.mul_(beta1).add_(gW, alpha=1 - beta1)
        self.vW.mul_(beta2).addcmul_(gW, gW, value=1 - beta2)
        self.mb.mul_(beta1).add_(gb, alpha=1 - beta1)
        self.vb.mul_(beta2).addcmul_(gb, gb, value=1 - beta2)
        self.W.mul_(1 - (lr * self.wd).view(1, H, 1))
        self.W.sub_(lr.view(1, H, 1) * (self.mW / c1) / ((self.vW / c2).sqrt() + self.eps))
        self.b.sub_(lr.view(H, 1) * (self.mb / c1) / ((self.vb / c2).sqrt() + self.eps))


class _EarlyStopping:
    """Per head: the best epoch so far (validation accuracy, then loss) and its weights; stops a head after ``patience`` worse epochs."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor, patience: int):
        H, dev = W.shape[1], W.device
        self.W, self.b, self.patience = W.clone(), b.clone(), patience
        self.acc = torch.full((H,), -1.0, device=dev)
        self.loss = torch.full((H,), float("inf"), device=dev)
        self.since = torch.zeros(H, dtype=torch.long, device=dev)
        self.active = torch.ones(H, dtype=torch.bool, device=dev)

    def update(self, acc: torch.Tensor, loss: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Record this epoch's scores; returns which heads keep training."""
        H = len(acc)
        better = self.active & ((acc > self.acc) | ((acc == self.acc) & (loss < self.loss)))
        self.W = torch.where(better.view(1, H, 1), W, self.W)
        self.b = torch.where(better.view(H, 1), b, self.b)
        self.acc = torch.where(better, acc, self.acc)
        self.loss = torch.where(better, loss, self.loss)
        self.since = torch.where(better, torch.zeros_like(self.since), self.since + 1)
        self.active &= self.since < self.patience
        return self.active


def _evaluate_heads(rows: Rows, W: torch.Tensor, b: torch.Tensor, dev: torch.device):
    """Accuracy [H] and mean cross-entropy [H] of every head on ``rows``."""
    D, H, C = W.shape
    correct = torch.zeros(H, device=dev)
    loss = torch.zeros(H, device=dev)
    for X, y in rows.chunks(dev):
        logits = (X @ W.view(D, H * C)).view(-1, H, C) + b
        correct += (logits.argmax(2) == y.view(-1, 1)).float().sum(0)
        loss += torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), y.view(-1, 1).expand(-1, H), reduction="none").sum(0)
    return correct / len(rows), loss / len(rows)


class TorchLinearClassifier(LinearWeights, TorchHead):
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

    _validate = TorchHead._validate_training

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
        X, y_idx = self._prepare(X, y)
        return self._fit_grid(X, y_idx, grid)

    def fit_grid_rows(self, rows: Rows, classes: np.ndarray, n_features: int, grid: list[dict]) -> list["TorchLinearClassifier"]:
        """:meth:`fit_grid` on rows streamed from disk (``rows.y``: indices into ``classes``)."""
        self._validate()
        self.classes_, self.n_features_in_ = np.asarray(classes), int(n_features)
        return self._fit_grid(rows, rows.y, grid)

    def _fit_grid(self, X, y_idx, grid: list[dict]) -> list["TorchLinearClassifier"]:
        bad = [k for entry in grid for k in entry if k not in ("lr", "weight_decay")]
        if bad:
            raise ValueError(f"fit_grid varies only lr and weight_decay, not {sorted(set(bad))}")
        heads_est = [clone(self).set_params(**entry) for entry in grid]
        for est in heads_est:
            est._validate()
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
