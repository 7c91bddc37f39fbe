"""Near-duplicate pairs and outlier distances, from the kNN head's chunked top-k search over the store's rows.

One search of every row against every row (in blocks, within a memory budget) gives each image's ``k``
nearest neighbours: the pairs at or above the cosine threshold are near-duplicates, the ``k``-th
neighbour's distance is the any-class outlier score. With pixel verification (``_verify``), pairs in a band
below the threshold are candidates that their images may confirm. A second search within each class gives the
same-class score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..store import FeatureStore

__all__ = ["Rows", "Neighbours", "PixelRule", "reader", "search", "candidate_pairs", "near_duplicate_pairs", "outlier_scores"]


@dataclass
class Rows:
    """What the audit knows of every row of a group without reading features."""

    key: str
    ids: np.ndarray  # [n] str
    labels: np.ndarray  # [n] int64 class index, -1 unlabeled
    splits: np.ndarray  # [n] str
    class_names: list[str]
    digests: np.ndarray | None  # [n] content digests; None: not recorded
    blocks: list[tuple[int, int]] | None  # column range of every tap (several taps), else None

    def __len__(self) -> int:
        return len(self.ids)

    def label_name(self, i: int) -> str | None:
        return self.class_names[self.labels[i]] if self.labels[i] >= 0 else None


@dataclass
class Neighbours:
    """Every row's ``k`` nearest other rows, best first (row -1 and similarity -inf where there were fewer)."""

    similarity: np.ndarray  # [n, k] float32 cosine similarity
    rows: np.ndarray  # [n, k] int64 row numbers


def reader(store: FeatureStore, key: str, blocks, budget_bytes: int):
    """``read(rows)``: the unit-length features (every tap weighing the same) of sorted row numbers; held in memory
    after one read when they take at most an eighth of the budget (the per-class searches then read no scattered rows)."""
    from ..heads import unit_rows

    n, dim = len(store.row_numbers(key)), store.feature_dim(key)
    if n * dim * 4 * 8 <= budget_bytes:
        X = unit_rows(store.features_of(key, np.arange(n)), blocks)
        return lambda rows: X[rows]
    return lambda rows: unit_rows(store.features_of(key, rows), blocks, copy=False)  # a fresh array: normalised in place


def search(read, query_rows: np.ndarray, reference_rows: np.ndarray, k: int, *, budget_bytes: int, device: str) -> Neighbours:
    from ..heads import blocked_top_k

    sims, rows = blocked_top_k(read, query_rows, reference_rows, k, budget_bytes=budget_bytes, device=device)
    return Neighbours(sims, rows)


@dataclass
class PixelRule:
    """The second stage of the near-duplicate check: candidates in the band [candidate, threshold) of cosine similarity
    are near-duplicates when their images' pixel similarity (``_verify``) is at or above ``pixel_threshold``."""

    candidate: float  # cosine at or above which a pair is a candidate
    pixel_threshold: float  # pixel similarity at or above which a candidate is a near-duplicate
    similarities: Callable[[np.ndarray], np.ndarray]  # [m, 2] row pairs -> [m] pixel similarity (NaN: an image unreadable)


def candidate_pairs(neighbours: Neighbours, lowest: float) -> tuple[np.ndarray, np.ndarray]:
    """([m, 2] row numbers (lower first), [m] cosine): every pair among the neighbours at or above ``lowest`` once."""
    a, j = np.nonzero(neighbours.similarity >= lowest)
    b = neighbours.rows[a, j]
    keep = b >= 0
    lo, hi = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    sims = neighbours.similarity[a[keep], j[keep]]
    if not len(lo):
        return np.empty((0, 2), np.int64), np.empty(0, np.float32)
    pairs, first = np.unique(np.stack([lo, hi], 1), axis=0, return_index=True)
    return pairs, sims[first]


def near_duplicate_pairs(neighbours: Neighbours, rows: Rows, threshold: float, pixels: PixelRule | None = None) -> tuple[list[dict], int, dict]:
    """(pairs, rows whose k-th neighbour is still a near-duplicate, what the pixels checked): every pair at or above
    ``threshold`` once, and with ``pixels`` every candidate its images confirm, with both ids, splits and labels, its
    cosine, its pixel similarity (None: not checked) and how it was found, most similar first. A row with more
    near-duplicates than ``k`` lists ``k`` of them."""
    lowest = threshold if pixels is None else min(threshold, pixels.candidate)
    pairs, sims = candidate_pairs(neighbours, lowest)
    strict = sims >= threshold
    pixel = np.full(len(pairs), np.nan)
    checked = {"candidates": int((~strict).sum()) if pixels else 0, "unreadable": 0, "confirmed": 0}
    if pixels is not None and (~strict).any():
        pixel[~strict] = pixels.similarities(pairs[~strict])
        checked["unreadable"] = int(np.isnan(pixel[~strict]).sum())
    confirmed = ~strict & (pixel >= (pixels.pixel_threshold if pixels else np.inf))
    checked["confirmed"] = int(confirmed.sum())
    keep = np.flatnonzero(strict | confirmed)
    out = []
    for n in keep[np.argsort(-sims[keep], kind="stable")]:
        i, m = (int(v) for v in pairs[n])
        same_bytes = rows.digests is not None and rows.digests[i] != b"" and rows.digests[i] == rows.digests[m]
        out.append({"a": str(rows.ids[i]), "b": str(rows.ids[m]), "a_row": i, "b_row": m,
                    "a_split": str(rows.splits[i]), "b_split": str(rows.splits[m]),
                    "a_label": rows.label_name(i), "b_label": rows.label_name(m), "similarity": round(float(sims[n]), 5),
                    "pixel_similarity": None if np.isnan(pixel[n]) else round(float(pixel[n]), 5),
                    "found_by": "cosine" if strict[n] else "pixels",
                    "across_splits": bool(rows.splits[i] != rows.splits[m]), "identical_bytes": bool(same_bytes)})
    saturated = int((neighbours.similarity[:, -1] >= threshold).sum()) if neighbours.similarity.shape[1] else 0
    return out, saturated, checked


def outlier_scores(read, rows: Rows, neighbours: Neighbours, k: int, *, budget_bytes: int, device: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(any-class distance [n], same-class distance [n] (NaN where undefined), classes left out): the cosine distance
    (1 - similarity) to the ``k``-th nearest other image, and to the ``k``-th nearest other image of the same class."""
    any_class = 1.0 - neighbours.similarity[:, k - 1].astype(np.float64) if neighbours.similarity.shape[1] >= k else np.full(len(rows), np.nan)
    any_class[~np.isfinite(any_class)] = np.nan
    same_class, left_out = np.full(len(rows), np.nan), []
    for c in np.unique(rows.labels[rows.labels >= 0]):
        members = np.flatnonzero(rows.labels == c)
        if len(members) <= k:
            left_out.append(f"{rows.class_names[c]} ({len(members)})")
            continue
        within = search(read, members, members, k, budget_bytes=budget_bytes, device=device)
        same_class[members] = 1.0 - within.similarity[:, k - 1]
    return any_class, same_class, left_out
