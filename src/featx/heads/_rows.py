"""Training rows for the torch heads: in memory, or streamed in chunks from a reader so memory stays bounded.

A head trains on :class:`Rows` minibatches; what holds the rows (an array, or a feature store read
chunk by chunk) stays out of the training code. Streaming shuffles the order of the chunks and
the rows within each chunk, so an epoch reads every row once with one chunk in memory.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

__all__ = ["Rows", "ArrayRows", "StreamedRows"]


class Rows:
    """Rows with class indices ``y`` (all in memory: they are small); features come in batches."""

    y: np.ndarray  # [n] class index per row

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled minibatches (x [b, D] float32, y [b]) on ``device``; one epoch."""
        raise NotImplementedError

    def chunks(self, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All rows in order, in chunks (for evaluation)."""
        raise NotImplementedError

    def subset(self, idx: np.ndarray) -> "Rows":
        raise NotImplementedError

    def n_batches(self, batch_size: int) -> int:
        """Minibatches per epoch of :meth:`batches`."""
        return -(-len(self.y) // batch_size)


class ArrayRows(Rows):
    """Rows held in an array (moved to the device once)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, chunk_rows: int = 8192):
        self.X, self.y, self.chunk_rows = X, np.asarray(y, dtype=np.int64), chunk_rows
        self._on: tuple | None = None

    def _tensors(self, device: torch.device):
        if self._on is None or self._on[0] != device:
            self._on = (device, torch.as_tensor(np.ascontiguousarray(self.X, dtype=np.float32), device=device),
                        torch.as_tensor(self.y, device=device))
        return self._on[1], self._on[2]

    def batches(self, batch_size, generator, device):
        X, y = self._tensors(device)
        perm = torch.randperm(len(self.y), generator=generator).to(device)
        for s in range(0, len(self.y), batch_size):
            bi = perm[s : s + batch_size]
            yield X[bi], y[bi]

    def chunks(self, device):
        X, y = self._tensors(device)
        for s in range(0, len(self.y), self.chunk_rows):
            yield X[s : s + self.chunk_rows], y[s : s + self.chunk_rows]

    def subset(self, idx):
        return ArrayRows(self.X[idx], self.y[idx], self.chunk_rows)


class StreamedRows(Rows):
    """Rows read on demand: ``read(rows)`` returns the features of sorted row numbers (e.g. from an HDF5 store),
    ``transform`` the fitted preprocessing applied to each chunk. At most ``chunk_rows`` rows are in memory."""

    def __init__(self, read: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, y: np.ndarray, *, chunk_rows: int,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None):
        self.read, self.rows, self.y = read, np.asarray(rows), np.asarray(y, dtype=np.int64)
        self.chunk_rows, self.transform = max(1, int(chunk_rows)), transform

    def _load(self, positions: np.ndarray) -> np.ndarray:
        X = self.read(self.rows[positions])
        X = self.transform(X) if self.transform is not None else X
        return np.ascontiguousarray(X, dtype=np.float32)

    def batches(self, batch_size, generator, device):
        starts = np.arange(0, len(self.y), self.chunk_rows)
        for c in torch.randperm(len(starts), generator=generator).tolist():
            positions = np.arange(starts[c], min(starts[c] + self.chunk_rows, len(self.y)))
            X = torch.as_tensor(self._load(positions), device=device)
            y = torch.as_tensor(self.y[positions], device=device)
            perm = torch.randperm(len(positions), generator=generator).to(device)
            for s in range(0, len(positions), batch_size):
                bi = perm[s : s + batch_size]
                yield X[bi], y[bi]

    def chunks(self, device):
        for s in range(0, len(self.y), self.chunk_rows):
            positions = np.arange(s, min(s + self.chunk_rows, len(self.y)))
            yield torch.as_tensor(self._load(positions), device=device), torch.as_tensor(self.y[positions], device=device)

    def n_batches(self, batch_size: int) -> int:
        sizes = [min(self.chunk_rows, len(self.y) - s) for s in range(0, len(self.y), self.chunk_rows)]
        return sum(-(-n // batch_size) for n in sizes)

    def subset(self, idx):
        return StreamedRows(self.read, self.rows[idx], self.y[idx], chunk_rows=self.chunk_rows, transform=self.transform)
