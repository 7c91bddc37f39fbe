"""Ridge classification (least squares on +-1 targets, as scikit-learn's ``RidgeClassifier``) for many alphas from one
eigendecomposition, with ``alpha='auto'`` chosen by exact leave-one-out on the training rows (what ``RidgeClassifierCV`` does).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import clone

from ..device import resolve_device
from ._torch_base import LinearWeights, TorchHead, class_weights

__all__ = ["RidgeClassifier", "RIDGE_ALPHAS"]

# alpha='auto' chooses among these (leave-one-out accuracy on the training rows); --sweep uses the registry's grid
RIDGE_ALPHAS = tuple(float(f"{a:.3g}") for a in np.logspace(-2, 6, 17))


def _eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a symmetric matrix; on CPU with LAPACK's MRRR driver through SciPy, which took
    0.6 s where torch.linalg.eigh took 23 s on a 1280 x 1280 Gram matrix on the 2-core machine of benchmarks/RESULTS.md."""
    if gram.device.type != "cpu":
        return torch.linalg.eigh(gram)
    import scipy.linalg

    lam, V = scipy.linalg.eigh(gram.numpy(), driver="evr")
    return torch.from_numpy(lam), torch.from_numpy(V)


class _Factorisation:
    """Weighted, centred training data, its Gram matrix, and (on demand, once) the Gram matrix's eigenbasis, in which
    every alpha's solution is a rescaling."""

    def __init__(self, X: torch.Tensor, T: torch.Tensor, w: torch.Tensor):
        sw = w.sum()
        self.x_mean = (w[:, None] * X).sum(0) / sw
        self.t_mean = (w[:, None] * T).sum(0) / sw
        self.root_w = w.sqrt()[:, None]
        self._Xc = (X - self.x_mean) * self.root_w
        self._Tc = (T - self.t_mean) * self.root_w
        self.gram = (self._Xc.T @ self._Xc).double()  # D x D: features are few compared with rows
        self.xt = (self._Xc.T @ self._Tc).double()  # X^T T  [D, K]
        self.sw = sw
        self._eig = None

    @property
    def eig(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(eigenvalues, eigenvectors, V^T X^T T) of the Gram matrix, computed once."""
        if self._eig is None:
            lam, V = _eigh(self.gram)
            self._eig = (lam.clamp_min(0), V, V.T @ self.xt)
        return self._eig

    def coef(self, alpha: float, *, path: bool = True) -> torch.Tensor:
        """W [D, K] of ``min ||T - X W - b||^2_w + alpha ||W||^2``: from the eigenbasis (``path``), or one Cholesky solve."""
        if path:
            lam, V, proj = self.eig
            W = V @ (proj / (lam[:, None] + alpha))
        else:
            eye = torch.eye(len(self.gram), dtype=self.gram.dtype, device=self.gram.device)
            W = torch.cholesky_solve(self.xt, torch.linalg.cholesky(self.gram + alpha * eye))
        return W.to(self._Xc.dtype)

    def intercept(self, W: torch.Tensor) -> torch.Tensor:
        return self.t_mean - self.x_mean @ W

    def loo_accuracy(self, alpha: float, y: torch.Tensor, rows_V: torch.Tensor) -> float:
        """Exact leave-one-out accuracy of ``alpha`` (hat-matrix diagonal from the eigenbasis; intercept included)."""
        lam = self.eig[0]
        W = self.coef(alpha)
        fitted = self._Xc @ W  # weighted, centred predictions
        hat = (rows_V.double() ** 2 / (lam + alpha)).sum(1) + (self.root_w[:, 0].double() ** 2) / self.sw.double()
        loo = (self._Tc - (self._Tc - fitted) / (1 - hat.to(fitted.dtype))[:, None]) / self.root_w + self.t_mean
        predicted = (loo[:, 0] > 0).long() if loo.shape[1] == 1 else loo.argmax(1)
        return float((predicted == y).float().mean())


class RidgeClassifier(LinearWeights, TorchHead):
    """Ridge classifier: targets +-1 per class (one column for two classes), least squares with an L2 penalty ``alpha``.

    Parameters
    ----------
    alpha : penalty, or 'auto' to choose it among ``RIDGE_ALPHAS`` by exact leave-one-out accuracy on the training rows.
    class_weight : None, 'balanced' or a dict {class label: weight} (as sample weights).
    device : 'auto' (CUDA when present), 'cpu' or 'cuda[:N]'.
    random_state : kept for the common head interface (the solution is deterministic).
    """

    streams = False  # needs its training rows in memory

    def __init__(self, *, alpha="auto", class_weight=None, device: str = "auto", random_state: int = 0):
        self.alpha = alpha
        self.class_weight = class_weight
        self.device = device
        self.random_state = random_state

    def _validate(self) -> None:
        super()._validate()
        if not (self.alpha == "auto" or (isinstance(self.alpha, (int, float, np.number)) and self.alpha > 0)):
            raise ValueError(f"alpha must be a positive number or 'auto', got {self.alpha!r}")

    def _factorise(self, X: np.ndarray, y_idx: np.ndarray) -> _Factorisation:
        dev = resolve_device(self.device)
        K = len(self.classes_)
        Xt = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=dev)
        T = -torch.ones(len(X), K, device=dev)
        T[torch.arange(len(X), device=dev), torch.as_tensor(y_idx, device=dev)] = 1.0
        if K == 2:  # scikit-learn: one column, +1 for classes_[1]
            T = T[:, 1:]
        w = torch.as_tensor(class_weights(self.class_weight, y_idx, self.classes_)[y_idx], device=dev)
        return _Factorisation(Xt, T, w)

    def _fit(self, X, y_idx) -> None:
        fact = self._factorise(X, y_idx)
        if self.alpha != "auto":
            return self._set_solution(fact, float(self.alpha), path=False)
        rows_V = fact._Xc @ fact.eig[1].to(fact._Xc.dtype)
        yt = torch.as_tensor(y_idx, device=rows_V.device)
        scores = [fact.loo_accuracy(a, yt, rows_V) for a in RIDGE_ALPHAS]
        self._set_solution(fact, RIDGE_ALPHAS[int(np.argmax(scores))])

    def _set_solution(self, fact: _Factorisation, alpha: float, path: bool = True) -> None:
        W = fact.coef(alpha, path=path)
        self.coef_ = W.T.cpu().numpy().astype(np.float32).copy()  # [K or 1, D], as scikit-learn
        self.intercept_ = fact.intercept(W).cpu().numpy().astype(np.float32).copy()
        self.alpha_ = alpha

    def fit_grid(self, X, y, grid: list[dict]) -> list["RidgeClassifier"]:
        """One fitted clone per entry of ``grid`` (dicts of ``alpha``), all from one factorisation."""
        bad = sorted({k for entry in grid for k in entry if k != "alpha"})
        if bad:
            raise ValueError(f"fit_grid varies only alpha, not {bad}")
        X, y_idx = self._prepare(X, y)
        fact = self._factorise(X, y_idx)
        fitted = [clone(self).set_params(**entry) for entry in grid]
        for est in fitted:
            est._validate()
            est.classes_, est.n_features_in_ = self.classes_, self.n_features_in_
            est._set_solution(fact, float(est.alpha))
        return fitted

    def _logits(self, X: np.ndarray) -> np.ndarray:
        z = X @ self.coef_.T.astype(np.float64) + self.intercept_.astype(np.float64)
        return np.concatenate([-z / 2, z / 2], axis=1) if z.shape[1] == 1 else z  # two classes: decision_function is z

    _has_proba = False  # least-squares scores are not probabilities: featx ranks by the softmax of decision_function

    def learned_extra(self) -> dict:
        return {"alpha": self.alpha_}

    def load_state_tensors(self, state: dict, classes: np.ndarray, extra: dict) -> None:
        self._load_state(state)
        self.classes_ = classes
        self.alpha_ = float(extra.get("alpha", self.alpha if self.alpha != "auto" else float("nan")))
