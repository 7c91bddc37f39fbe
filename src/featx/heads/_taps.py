"""Per-tap normalisation: every pooled output of a multi-tap embedding (``featx extract --layers``) scaled to unit norm.

Concatenated taps have very different widths and scales (EfficientNet-Lite0: 1280 pre-logits dims against 24..320
per stage); normalising each block separately gives every tap the same weight in a cosine similarity or a distance.
"""

from __future__ import annotations

import json

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

__all__ = ["TapNormalizer", "tap_blocks"]


def tap_blocks(attrs: dict) -> list[tuple[int, int]] | None:
    """Column ranges ``[(start, stop)]`` of the taps of a multi-tap group (its attributes' ``taps``); None for one tap."""
    taps = json.loads(attrs.get("taps") or "[]")
    return [(int(t["start"]), int(t["stop"])) for t in taps] if len(taps) > 1 else None


class TapNormalizer(TransformerMixin, BaseEstimator):
    """L2-normalise each column block ``[start, stop)`` of ``blocks`` (then rescale by 1/sqrt(number of blocks), so a
    row's total norm is 1). Stateless: ``fit`` only records the input width."""

    def __init__(self, blocks: tuple = ()):
        self.blocks = blocks

    def fit(self, X, y=None):
        X = np.asarray(X)
        stops = [int(b[1]) for b in self.blocks]
        if not self.blocks or max(stops) > X.shape[1]:
            raise ValueError(f"tap blocks {self.blocks} do not fit {X.shape[1]} features")
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X):
        X = np.array(X, dtype=np.float32, copy=True)
        scale = 1.0 / np.sqrt(len(self.blocks))
        for start, stop in self.blocks:
            block = X[:, int(start) : int(stop)]
            block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
            block *= scale
        return X
