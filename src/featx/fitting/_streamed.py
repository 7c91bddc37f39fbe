"""Fitting a head on training features larger than memory: rows stream from the store in chunks.

Preprocessing is fitted in one streamed pass (standardisation from running sums), then a head that
trains on minibatches (logreg, torch-linear, mlp) learns from shuffled chunks; test scores are
computed chunk by chunk. At most one chunk of features is in memory at a time.
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ..configs import FitHeadConfig
from ..errors import FeatxError
from ..heads import HEADS, full_scores
from ..heads._rows import StreamedRows
from ..heads._sweep import sweep_rows
from ..store import FeatureStore
from ._plan import FitPlan, sweep_grid

__all__ = ["fit_streamed", "chunk_rows_for"]

_logger = logging.getLogger(__name__)


def chunk_rows_for(budget: int, dim: int) -> int:
    """Rows per chunk: a quarter of the memory budget (the chunk, its transformed copy and the training buffers fit)."""
    return max(256, budget // 4 // (dim * 4))


def fit_streamed(store: FeatureStore, plan: FitPlan, pipeline: Pipeline, config: FitHeadConfig, budget: int):
    """(fitted pipeline, SweepResult or None, test scores [n_test, K], test predictions)."""
    head = pipeline.named_steps["head"]
    gb = plan.train_bytes / 1e9
    if not getattr(head, "streams", False):
        streaming = ", ".join(n for n, s in HEADS.items() if n in ("logreg", "torch-linear", "mlp"))
        raise FeatxError(f"head '{config.head}' needs its {gb:.1f} GB of training features in memory, more than the "
                         f"{budget / 1e9:.1f} GB allowed (--max-memory); use a head that streams ({streaming}) or raise --max-memory")
    if "pca" in pipeline.named_steps:
        raise FeatxError(f"--pca needs the {gb:.1f} GB of training features in memory, more than the {budget / 1e9:.1f} GB allowed; "
                         "drop --pca or raise --max-memory")
    chunk = chunk_rows_for(budget, plan.dim)
    _logger.info("training features (%.1f GB) exceed the memory budget (%.1f GB): streaming them in chunks of %d rows",
                 gb, budget / 1e9, chunk)
    read = lambda rows: store.features_of(plan.key, rows)  # noqa: E731
    steps = _fit_preprocessing(pipeline, read, plan, chunk)
    transform = Pipeline(steps).transform if steps else None
    classes = np.unique(plan.y_train)
    rows = StreamedRows(read, plan.train_rows, np.searchsorted(classes, plan.y_train), chunk_rows=chunk, transform=transform)
    sweep_result = None
    if config.sweep:
        grid = sweep_grid(config, head.get_params())
        head, sweep_result = sweep_rows(head, rows, classes, plan.dim, grid, val_fraction=config.val_fraction,
                                        random_state=config.seed)
    else:
        head = clone(head).fit_rows(rows, classes, plan.dim)
    fitted = Pipeline(steps + [("head", head)])
    scores = _test_scores(fitted, read, plan, chunk)
    return fitted, sweep_result, scores, scores.argmax(1)


def _fit_preprocessing(pipeline: Pipeline, read, plan: FitPlan, chunk: int) -> list:
    """The pipeline's preprocessing steps fitted in one pass over the training rows (features checked to be finite)."""
    steps = [(name, clone(step)) for name, step in pipeline.steps[:-1]]
    for start in range(0, len(plan.train_rows), chunk):
        rows = plan.train_rows[start : start + chunk]
        X = read(rows)
        bad = ~np.isfinite(X).all(axis=1)
        if bad.any():
            raise FeatxError(f"{int(bad.sum())} feature rows of '{plan.key}' (split '{plan.train_split}') hold NaN or infinite values "
                             f"(e.g. row {int(rows[bad][0])}); re-extract with 'featx extract ... --dtype float32 --precision fp32 --overwrite'")
        for _, step in steps:  # running statistics (StandardScaler) or stateless steps (Normalizer)
            if isinstance(step, StandardScaler):
                step.partial_fit(X)
            else:
                step.fit(X)
            X = step.transform(X)
    return steps


def _test_scores(pipeline: Pipeline, read, plan: FitPlan, chunk: int) -> np.ndarray:
    n_classes = len(plan.class_names)
    return np.concatenate([full_scores(pipeline, read(plan.test_rows[s : s + chunk]), n_classes)
                           for s in range(0, len(plan.test_rows), chunk)]) if len(plan.test_rows) else np.zeros((0, n_classes))
