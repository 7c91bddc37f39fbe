"""Unit-length rows and the count of query rows with a near-duplicate among reference rows, without torch on a CPU.

fit-head counts its test images that have a near-duplicate among its training images; a scikit-learn head on a
CPU then never loads torch. On the CPU the count is a blocked numpy product (BLAS, as fast as torch there); where a
GPU may be used, :func:`~featx.heads._neighbours.blocked_top_k` runs the same search on it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..machine import certainly_cpu
from ._taps import TapNormalizer

__all__ = ["unit_rows", "near_duplicate_count"]

_MAX_SIMILARITIES = 1 << 25  # floats of one query block x reference block product (128 MB)


def unit_rows(X: np.ndarray, blocks: list[tuple[int, int]] | None = None, *, copy: bool = True) -> np.ndarray:
    """Rows scaled to unit length (in place when ``copy`` is False and ``X`` is float32); with ``blocks`` (the taps of a
    multi-tap embedding) every tap weighs the same (:class:`~featx.heads._taps.TapNormalizer`)."""
    if blocks:
        return TapNormalizer(tuple(blocks)).fit(X).transform(X)
    X = np.array(X, dtype=np.float32) if copy else np.asarray(X, dtype=np.float32)
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X


def near_duplicate_count(read: Callable[[np.ndarray], np.ndarray], query_rows: np.ndarray, reference_rows: np.ndarray,
                         threshold: float, *, budget_bytes: int, device: str = "auto") -> int:
    """How many ``query_rows`` have a row of ``reference_rows`` (not themselves) at cosine similarity ``threshold`` or
    above; ``read(rows)`` returns the unit-length float32 rows of sorted row numbers, read in blocks within
    ``budget_bytes``."""
    query_rows, reference_rows = np.asarray(query_rows, dtype=np.int64), np.asarray(reference_rows, dtype=np.int64)
    if len(query_rows) == 0 or len(reference_rows) == 0:
        return 0
    if not certainly_cpu(device):
        from ._neighbours import blocked_top_k

        sims, _ = blocked_top_k(read, query_rows, reference_rows, 1, budget_bytes=budget_bytes, device=device)
        return int((sims[:, 0] >= threshold).sum())
    dim = read(reference_rows[:1]).shape[1]
    block = max(1, int(budget_bytes // 8 // (4 * dim)))
    best = np.full(len(query_rows), -np.inf, np.float32)
    for qs in range(0, len(query_rows), block):
        q_rows = query_rows[qs : qs + block]
        queries = read(q_rows)
        for rs in range(0, len(reference_rows), block):
            r_rows = reference_rows[rs : rs + block]
            reference = queries if np.array_equal(r_rows, q_rows) else read(r_rows)
            chunk = max(1, _MAX_SIMILARITIES // len(r_rows))
            for s in range(0, len(q_rows), chunk):
                sim = queries[s : s + chunk] @ reference.T
                sim[q_rows[s : s + chunk, None] == r_rows[None, :]] = -np.inf  # a row is not its own near-duplicate
                np.maximum(best[qs + s : qs + s + len(sim)], sim.max(axis=1), out=best[qs + s : qs + s + len(sim)])
    return int((best >= threshold).sum())
