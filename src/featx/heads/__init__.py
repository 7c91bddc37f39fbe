"""Classification heads on cached embeddings, all of them scikit-learn estimators.

The scikit-learn heads are stock estimators behind optional preprocessing steps (standardise,
L2-normalise, PCA) in a :class:`~sklearn.pipeline.Pipeline`. The torch heads
(:class:`TorchLinearClassifier`, :class:`MLPClassifier`) follow the same contract: ``__init__``
stores its arguments, ``fit`` validates and learns, learned state ends in ``_``.

The registry (:data:`HEADS`, :func:`make_head`) imports neither torch nor scikit-learn; the
other names load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._registry import HEADS, TORCH_HEADS, HeadSpec, check_head_name, full_scores, grid_of, is_torch_head, make_head, predict_scores

_LAZY = {
    "SweepResult": "_sweep", "SweptHead": "_sweep", "sweep": "_sweep",
    "TorchLinearClassifier": "_torch_linear", "LinearHeads": "_torch_linear", "train_linear_heads": "_torch_linear",
    "MLPClassifier": "_mlp",
    "AUTO_EARLY_STOPPING_ROWS": "_torch_base", "early_stopping_split": "_torch_base", "auto_epochs": "_torch_base",
    "heads_linear_map": "_linear_map", "heads_score_map": "_linear_map", "fold_affine_steps": "_linear_map",
    "LogisticRegressionClassifier": "_logreg", "RidgeClassifier": "_ridge", "KNNClassifier": "_knn",
    "showing_progress": "_progress", "grid_edges": "_sweep",
    "chunked_top_k": "_neighbours", "blocked_top_k": "_neighbours", "unit_rows": "_near_duplicates",
    "near_duplicate_count": "_near_duplicates", "tap_blocks": "_taps",
}

__all__ = ["HEADS", "TORCH_HEADS", "HeadSpec", "check_head_name", "make_head", "grid_of", "predict_scores", "full_scores", "is_torch_head", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'featx.heads' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from ._knn import KNNClassifier  # noqa: F401
    from ._linear_map import fold_affine_steps, heads_linear_map, heads_score_map  # noqa: F401
    from ._logreg import LogisticRegressionClassifier  # noqa: F401
    from ._near_duplicates import near_duplicate_count, unit_rows  # noqa: F401
    from ._neighbours import blocked_top_k, chunked_top_k  # noqa: F401
    from ._progress import showing_progress  # noqa: F401
    from ._ridge import RidgeClassifier  # noqa: F401
    from ._mlp import MLPClassifier  # noqa: F401
    from ._taps import tap_blocks  # noqa: F401
    from ._sweep import SweepResult, SweptHead, grid_edges, sweep  # noqa: F401
    from ._torch_base import AUTO_EARLY_STOPPING_ROWS, auto_epochs, early_stopping_split  # noqa: F401
    from ._torch_linear import LinearHeads, TorchLinearClassifier, train_linear_heads  # noqa: F401
