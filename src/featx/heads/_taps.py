"""Per-tap normalisation: every pooled output of a multi-tap embedding (``featx extract --layers``) scaled to unit norm.

Concatenated taps have very different widths and scales (EfficientNet-Lite0: 1280 pre-logits dims against 24..320
per stage); normalising each block separately gives every tap the same weight in a cosine similarity or a distance.
"""

from __future__ import annotations

import json

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = ["TapNormalizer", "tap_blocks"]


def tap_blocks(attrs: dict) -> list[tuple[int, int]] | None:
    """Column ranges ``[(start, stop)]`` of the taps of a multi-tap group (its attributes' ``taps``); None for one tap."""
    taps = json.loads(attrs.get("taps") or "[]")
    return [(int(t["start"]), int(t["stop"])) for t in taps] if len(taps) > 1 else None


class TapNormalizer(TransformerMixin, BaseEstimator):
    """L2-normalise each column block ``[start, stop)`` of ``blocks`` (then rescale by 1/sqrt(number of blocks), so a
    row's total norm is 1). ``blocks=None``: the whole row is one block (scikit-learn's ``Normalizer``). Stateless:
    ``fit`` checks the blocks against the input width and records it."""

    def __init__(self, blocks: tuple | None = None):
        self.blocks = blocks

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=(np.float64, np.float32))
        stops = [int(b[1]) for b in self._blocks(X.shape[1])]
        if max(stops) > X.shape[1]:
            raise ValueError(f"tap blocks {self.blocks} do not fit {X.shape[1]} features")
        return self

    def _blocks(self, n_features: int) -> list:
        return [(0, n_features)] if self.blocks is None or len(self.blocks) == 0 else list(self.blocks)

    def transform(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float32, np.float64), copy=True)
        if X.dtype != np.float64:
            X = X.astype(np.float32, copy=False)
        blocks = self._blocks(self.n_features_in_)
        scale = 1.0 / np.sqrt(len(blocks))
        for start, stop in blocks:
            block = X[:, int(start) : int(stop)]
            block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
            block *= scale
        return X

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
