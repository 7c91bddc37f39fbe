"""k nearest neighbours on embeddings: one chunked neighbour search serves every k of a grid.

Similarities are computed on the device in query chunks (memory bounded), and only the top ``k``
neighbours of each query are kept (``chunked_top_k``). Votes are plain majority votes or DINOv2's
temperature-weighted votes (each neighbour counts ``exp(similarity / T)``), times the weight of the
neighbour's class when ``class_weight`` is given (``'balanced'``: rare classes' neighbours count more).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ..device import resolve_device
from ._neighbours import chunked_top_k
from ._torch_base import TorchHead, class_weights

__all__ = ["KNNClassifier"]


class KNNClassifier(TorchHead):
    """k nearest neighbours with cosine similarity (or euclidean distance) and majority or temperature-weighted votes.

    Parameters
    ----------
    n_neighbors : k.
    metric : 'cosine' (rows L2-normalised, similarity = dot product) or 'euclidean'.
    weights : 'uniform' (majority vote) or 'temperature' (DINOv2: weight exp(similarity / temperature); cosine only).
    temperature : the temperature of 'temperature' votes.
    class_weight : None, 'balanced' or a dict {class label: weight}: each neighbour's vote is multiplied by its class's weight.
    device : 'auto' (CUDA when present), 'cpu' or 'cuda[:N]'.
    random_state : kept for the common head interface.
    """

    streams = False  # searches its training rows in memory

    def __init__(self, *, n_neighbors: int = 10, metric: str = "cosine", weights: str = "uniform", temperature: float = 0.07,
                 class_weight=None, device: str = "auto", random_state: int = 0):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.weights = weights
        self.temperature = temperature
        self.class_weight = class_weight
        self.device = device
        self.random_state = random_state

    def _validate(self) -> None:
        super()._validate()
        if not (isinstance(self.n_neighbors, (int, np.integer)) and self.n_neighbors >= 1):
            raise ValueError(f"n_neighbors must be a positive integer, got {self.n_neighbors!r}")
        if self.metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {self.metric!r}")
        if self.weights not in ("uniform", "temperature") or (self.weights == "temperature" and self.metric != "cosine"):
            raise ValueError(f"weights must be 'uniform' or 'temperature' (with metric='cosine'), got {self.weights!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature!r}")

    def _fit(self, X, y_idx) -> None:
        self.fit_X_ = self._normalise(np.asarray(X, dtype=np.float32))
        self.fit_y_ = y_idx.astype(np.int64)

    def _normalise(self, X: np.ndarray) -> np.ndarray:
        if self.metric != "cosine":
            return X
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    def neighbours(self, X: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities [n, k], training-row indices [n, k]) of the ``k`` nearest training rows, best first."""
        dev = resolve_device(self.device)
        train = torch.as_tensor(self.fit_X_, device=dev)
        norms = (train * train).sum(1) if self.metric == "euclidean" else None
        queries = torch.as_tensor(self._normalise(np.asarray(X, dtype=np.float32)), device=dev)
        return chunked_top_k(queries, train, k, norms=norms)

    def _votes(self, sims: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
        """Class votes [n, n_classes] from the first ``k`` neighbours, normalised to sum 1."""
        labels = torch.as_tensor(self.fit_y_, device=idx.device)[idx[:, :k]]
        w = torch.ones_like(sims[:, :k]) if self.weights == "uniform" else (sims[:, :k] / self.temperature).exp()
        if self.class_weight is not None:
            w = w * torch.as_tensor(class_weights(self.class_weight, self.fit_y_, self.classes_), dtype=w.dtype, device=w.device)[labels]
        votes = torch.zeros(len(idx), len(self.classes_), dtype=w.dtype, device=w.device).scatter_add_(1, labels, w)
        return votes / votes.sum(1, keepdim=True).clamp_min(1e-30)  # zero class weights can leave a row without votes

    def _logits(self, X: np.ndarray) -> np.ndarray:
        sims, idx = self.neighbours(X, self.n_neighbors)
        return np.log(self._votes(sims, idx, self.n_neighbors).double().cpu().numpy() + 1e-300)  # softmax gives the votes back

    def grid_scores(self, X_tr, y_tr, X_va, y_va, grid: list[dict]) -> list[float]:
        """Validation accuracy of every ``n_neighbors`` (and ``temperature``) of ``grid`` from one neighbour search."""
        return [float(c.mean()) for c in self.grid_correct(X_tr, y_tr, X_va, y_va, grid)]

    def grid_correct(self, X_tr, y_tr, X_va, y_va, grid: list[dict]) -> np.ndarray:
        """[len(grid), n_val] bool: which validation rows every entry of ``grid`` classifies right, from one neighbour search."""
        bad = sorted({k for entry in grid for k in entry if k not in ("n_neighbors", "temperature")})
        if bad:
            raise ValueError(f"the kNN grid varies only n_neighbors and temperature, not {bad}")
        self.fit(X_tr, y_tr)
        k_max = max(int(e.get("n_neighbors", self.n_neighbors)) for e in grid)
        sims, idx = self.neighbours(X_va, k_max)
        y_va_idx = torch.as_tensor(np.searchsorted(self.classes_, y_va), device=idx.device)
        correct = []
        for entry in grid:
            est = self.set_params(**entry)
            votes = est._votes(sims, idx, int(est.n_neighbors))
            correct.append((votes.argmax(1) == y_va_idx).cpu().numpy())
        return np.stack(correct)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        check_is_fitted(self)
        return {"fit_X": torch.from_numpy(self.fit_X_), "fit_y": torch.from_numpy(self.fit_y_)}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.fit_X_, self.fit_y_ = state["fit_X"].numpy(), state["fit_y"].numpy()
        self.n_features_in_ = self.fit_X_.shape[1]

    def learned_extra(self) -> dict:
        return {}

    def load_state_tensors(self, state: dict, classes: np.ndarray, extra: dict) -> None:
        self._load_state(state)
        self.classes_ = classes
