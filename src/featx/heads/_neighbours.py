"""The chunked top-k neighbour search of the kNN head, and the same search over row blocks read from a store.

:func:`chunked_top_k` computes similarities on the device one query chunk at a time (at most
``_MAX_SIMILARITIES`` floats at once) and keeps the best ``k`` per query. :func:`blocked_top_k`
runs it over blocks of rows read on demand (an HDF5 store), merging each query's best ``k`` across
reference blocks, so memory stays within a budget however many rows there are: the audit's
near-duplicate and outlier checks use it, and fit-head's train/test near-duplicate count where a GPU may be used.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..device import resolve_device
from ._near_duplicates import _MAX_SIMILARITIES  # one bound for both searches (128 MB of similarities)

__all__ = ["chunked_top_k", "blocked_top_k"]



def chunked_top_k(queries: torch.Tensor, reference: torch.Tensor, k: int, *, norms: torch.Tensor | None = None,
                  query_ids: torch.Tensor | None = None, reference_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities [n, k], reference indices [n, k]) of the ``k`` best reference rows of every query, best first.

    Similarity is the dot product (cosine for unit rows); with ``norms`` (squared reference norms) it is
    ``2 q.t - |t|^2``, which orders rows as the euclidean distance does. With ``query_ids`` and ``reference_ids``
    a query never finds the reference row with its own id (a row is not its own neighbour).
    """
    k = min(k, len(reference))
    chunk = max(1, _MAX_SIMILARITIES // max(1, len(reference)))
    sims, idx = [], []
    for s in range(0, len(queries), chunk):
        sim = queries[s : s + chunk] @ reference.T
        if norms is not None:
            sim = 2 * sim - norms
        if query_ids is not None:
            sim.masked_fill_(query_ids[s : s + chunk, None] == reference_ids[None, :], -torch.inf)
        top = sim.topk(k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
    if not sims:
        return torch.empty(0, k, device=reference.device), torch.empty(0, k, dtype=torch.long, device=reference.device)
    return torch.cat(sims), torch.cat(idx)


def blocked_top_k(read: Callable[[np.ndarray], np.ndarray], query_rows: np.ndarray, reference_rows: np.ndarray, k: int, *,
                  budget_bytes: int, device: str = "auto", exclude_self: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(similarities [n, k] float32, reference row numbers [n, k] int64) of the ``k`` best ``reference_rows`` of every
    ``query_rows`` row, best first; missing neighbours (fewer reference rows than ``k``) have similarity -inf and row -1.

    ``read(rows)`` returns the (already normalised) float32 features of sorted row numbers. Queries and references
    are read in blocks of at most ``budget_bytes / 8`` each (one block each when both fit), which leaves room for
    the copies a block goes through while it is read and normalised; with ``exclude_self`` a row is never its own
    neighbour. Besides the budget, memory holds the best ``k`` of every query and one similarity chunk (128 MB).
    """
    dev = resolve_device(device)
    query_rows, reference_rows = np.asarray(query_rows, dtype=np.int64), np.asarray(reference_rows, dtype=np.int64)
    if len(query_rows) == 0 or len(reference_rows) == 0:
        return np.full((len(query_rows), k), -np.inf, np.float32), np.full((len(query_rows), k), -1, np.int64)
    dim = read(reference_rows[:1]).shape[1]
    block = max(1, int(budget_bytes // 8 // (4 * dim)))
    same = exclude_self and np.intersect1d(query_rows, reference_rows).size > 0
    best_s = torch.full((len(query_rows), k), -torch.inf, device=dev)
    best_i = torch.full((len(query_rows), k), -1, dtype=torch.long, device=dev)
    for qs in range(0, len(query_rows), block):
        q_rows = query_rows[qs : qs + block]
        queries = torch.as_tensor(read(q_rows), device=dev)
        q_ids = torch.as_tensor(q_rows, device=dev) if same else None
        for rs in range(0, len(reference_rows), block):
            r_rows = reference_rows[rs : rs + block]
            reference = queries if np.array_equal(r_rows, q_rows) else torch.as_tensor(read(r_rows), device=dev)
            r_ids = torch.as_tensor(r_rows, device=dev)
            s, i = chunked_top_k(queries, reference, k, query_ids=q_ids, reference_ids=r_ids if same else None)
            del reference  # before the next block is read
            merged_s = torch.cat([best_s[qs : qs + block], s], 1)
            merged_i = torch.cat([best_i[qs : qs + block], r_ids[i]], 1)
            top = merged_s.topk(k, dim=1)
            best_s[qs : qs + block], best_i[qs : qs + block] = top.values, merged_i.gather(1, top.indices)
        del queries
    best_i[torch.isinf(best_s)] = -1
    return best_s.cpu().numpy(), best_i.cpu().numpy()
