"""``featx fit-head``: fit a head on a split of cached embeddings, test it once, save it with its provenance.

Training features that fit the memory budget are read at once; larger ones stream from the store
in chunks (:mod:`featx.fitting._streamed`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..configs import NEAR_DUPLICATE_COSINE, FitHeadConfig
from ..errors import FeatxError, shell_command
from ..files import check_writable, jsonable
from ..head_folder import BACKBONE_ATTRS, FORMAT, PREDICTIONS, predictions_csv, save_head
from ..heads import check_head_name, full_scores, make_head, showing_progress
from ..metrics import classification_metrics
from ..provenance import provenance
from ..statistics import format_metrics, interval_description, metrics_with_intervals, with_interval
from ..store import FeatureStore
from ._plan import FitPlan, head_params, memory_budget, plan_fit, sweep_grid

__all__ = ["FitHeadResult", "fit_head", "format_params", "near_duplicates_line"]

_logger = logging.getLogger(__name__)


@dataclass
class FitHeadResult:
    """What ``fit_head`` did; ``to_dict`` is the ``--json`` line."""

    out: Path
    head: str
    model: str
    metrics: dict
    n_train: int
    n_test: int
    fit_seconds: float
    predict_seconds: float
    train_split: str
    test_split: str | None  # test split name; None: a hold-out of the training split
    test_description: str  # which rows were tested, in words
    sweep: dict | None = None
    n_train_test_duplicates: int | None = None  # test rows whose image (same bytes) is also a training row; None: not recorded
    dim: int | None = None  # feature dimension the head was fitted on
    features: str | None = None  # the store, as given
    n_train_test_near_duplicates: int = 0  # test rows with a training row at cosine >= NEAR_DUPLICATE_COSINE
    intervals: str = ""  # how the metrics' 95% intervals (the ``*_ci`` fields) were computed

    def to_dict(self) -> dict:
        return {"head": self.head, "model": self.model, **self.metrics, "intervals": self.intervals, "n_train": self.n_train,
                "n_test": self.n_test,
                "fit_seconds": self.fit_seconds, "predict_seconds": self.predict_seconds, "train_split": self.train_split,
                "test_split": self.test_split, "test_split_description": self.test_description,
                "sweep_best": self.sweep["best"] if self.sweep else None, "sweep": self.sweep,
                "n_train_test_duplicates": self.n_train_test_duplicates,
                "n_train_test_near_duplicates": self.n_train_test_near_duplicates, "dim": self.dim, "features": self.features,
                "out": str(self.out)}

    def summary(self) -> str:
        dim = f" ({self.dim}-dimensional)" if self.dim else ""
        lines = [f"Head '{self.head}' on '{self.model}' features{dim}: trained on {self.n_train} rows of '{self.train_split}' "
                 f"in {self.fit_seconds:.2f} s, tested on {self.n_test} rows ({self.test_description})."]
        if self.sweep is not None and not self.sweep["curve"]:
            lines.append(f"Nothing to sweep: '{self.head}' has no regularisation left to choose with these options "
                         "(values given with --param stay fixed); fitted as is"
                         + (f" (validation accuracy {with_interval(self.sweep['best_val_accuracy'], self.sweep['best_val_accuracy_ci'])}"
                            f" on {self.sweep['n_val']} rows)." if self.sweep.get("n_val") else "."))
        elif self.sweep:
            s = self.sweep
            curve = ", ".join(f"{format_params(c['params'])}: {c['val_accuracy']:.4f}" for c in s["curve"])
            lines.append(f"Sweep ({'one batched pass' if s['batched'] else 'one fit per value'}, {s['n_train']} train / "
                         f"{s['n_val']} validation rows, {s['seconds']:.2f} s): chose {format_params(s['best'])} "
                         f"(validation accuracy {with_interval(s['best_val_accuracy'], s['best_val_accuracy_ci'])}{_tied(s)}); curve: {curve}")
        lines.append("  " + format_metrics(self.metrics) + f"  [{self.intervals}]")
        if self.n_train_test_near_duplicates:
            lines.append(near_duplicates_line(self.n_train_test_near_duplicates, self.n_test, self.features))
        command = shell_command("featx", "evaluate", self.out, self.features or "FEATURES.h5")
        lines.append(f"Saved to {self.out} (evaluate with '{command}').")
        return "\n".join(lines)


def _tied(sweep: dict) -> str:
    n = sweep.get("n_tied", 1)
    return f"; the middle of {n} values the validation rows cannot tell apart" if n > 1 else ""


def near_duplicates_line(n: int, n_test: int, features: str | None = None) -> str:
    command = shell_command("featx", "audit", features or "FEATURES.h5", "--out", "DIR")
    if 2 * n > n_test:  # most images: on these features the cosine cannot tell copies from look-alikes (e.g. 8-px digits)
        return (f"Note: {n} of the {n_test} test images are at cosine >= {NEAR_DUPLICATE_COSINE:g} from a training image: on these "
                f"features the cosine alone cannot tell copies from look-alikes; '{command}' checks the candidates' pixels.")
    return (f"Note: {n} of the {n_test} test images have a near-duplicate among the training images (cosine >= "
            f"{NEAR_DUPLICATE_COSINE:g}), which inflates the score; see them with '{command}'.")


def _near_duplicates(store: FeatureStore, plan: FitPlan, config: FitHeadConfig) -> int:
    """Test rows with a near-duplicate among the training rows (the kNN head's chunked search, bounded memory)."""
    from ..heads import near_duplicate_count, tap_blocks, unit_rows

    blocks = tap_blocks(plan.attrs)

    def read(rows):
        return unit_rows(store.features_of(plan.key, rows), blocks, copy=False)

    return near_duplicate_count(read, plan.test_rows, plan.train_rows, NEAR_DUPLICATE_COSINE, budget_bytes=memory_budget(config),
                                device=config.device)


def format_params(p: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


def fit_head(features: str | os.PathLike, config: FitHeadConfig, out: str | os.PathLike) -> FitHeadResult:
    """Fit head ``config.head`` on the training split of ``features``, test it, save it to ``out``."""
    out = Path(out)
    check_head_name(config.head)
    check_writable(out, option="--out", folder=True)
    with FeatureStore(features) as store, showing_progress(config.progress):
        plan = plan_fit(store, features, config, out)
        pipeline = _pipeline(config, plan.attrs)
        budget = memory_budget(config)
        t0 = time.perf_counter()
        if plan.train_bytes > budget:
            from ._streamed import fit_streamed  # streaming needs torch; a scikit-learn head in memory does not

            pipeline, sweep_result, scores, y_pred = fit_streamed(store, plan, pipeline, config, budget)
            fit_seconds = predict_seconds = time.perf_counter() - t0  # streamed: fitting and scoring share the reads
        else:
            pipeline, sweep_result, scores, y_pred, fit_seconds, predict_seconds = _fit_in_memory(store, plan, pipeline, config)
        near = _near_duplicates(store, plan, config)
        predictions = _predictions(store, plan, y_pred)
    metrics = classification_metrics(plan.y_test, y_pred, scores, n_classes=len(plan.class_names))
    metrics = metrics_with_intervals(metrics, plan.y_test, y_pred, seed=config.seed)
    intervals = interval_description(len(plan.y_test))
    sweep = sweep_result.to_dict() if sweep_result else None
    for note in sweep_result.edge_notes() if sweep_result else []:
        _logger.warning("'%s' on '%s': %s", config.head, plan.key, note)
    meta = {**_sidecar(config, features, plan, pipeline, metrics, sweep, fit_seconds, predict_seconds), "n_train_test_near_duplicates": near,
            "intervals": intervals}
    save_head(out, pipeline, meta, overwrite=True, files={PREDICTIONS: predictions})
    return FitHeadResult(out=out, head=config.head, model=plan.key, metrics=metrics, n_train=len(plan.train_rows),
                         n_test=len(plan.test_rows), fit_seconds=fit_seconds, predict_seconds=predict_seconds,
                         train_split=plan.train_split, test_split=plan.test_split, test_description=plan.test_description, sweep=sweep,
                         n_train_test_duplicates=plan.n_duplicates, dim=int(plan.dim), features=str(features),
                         n_train_test_near_duplicates=near, intervals=intervals)


def _predictions(store: FeatureStore, plan: FitPlan, y_pred: np.ndarray) -> str:
    """test_predictions.csv: every test image's id, true class and predicted class."""
    ids = store.ids_of(plan.key, plan.test_rows)
    names = np.asarray(plan.class_names, dtype=object)
    return predictions_csv(ids, names[plan.y_test], names[np.asarray(y_pred, dtype=np.int64)])


def _pipeline(config: FitHeadConfig, attrs: dict):
    blocks = None
    if config.tap_norm:
        taps = json.loads(attrs.get("taps") or "[]")
        if len(taps) < 2:
            raise FeatxError("--tap-norm needs features of several taps (featx extract --layers last,-1,...); these have one")
        blocks = [(t["start"], t["stop"]) for t in taps]
    return make_head(config.head, standardize=config.standardize, l2_normalize=config.l2_normalize, pca=config.pca,
                     params=head_params(config), random_state=config.seed, device=config.device, tap_blocks=blocks)


def _fit_in_memory(store: FeatureStore, plan: FitPlan, pipeline, config: FitHeadConfig):
    """(fitted pipeline, SweepResult or None, test scores, test predictions, fit seconds, predict seconds)."""
    train = store.read(plan.key, rows=plan.train_rows).require_finite(plan.train_split)
    test = store.read(plan.key, rows=plan.test_rows).require_finite(plan.test_split or plan.train_split)
    t0 = time.perf_counter()
    pipeline, sweep_result = _fit(pipeline, config, train.X, train.y)
    fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = full_scores(pipeline, test.X, len(plan.class_names))
    y_pred = np.asarray(pipeline.predict(test.X))
    return pipeline, sweep_result, scores, y_pred, fit_seconds, time.perf_counter() - t0


def _fit(pipeline, config: FitHeadConfig, X: np.ndarray, y: np.ndarray):
    """(fitted pipeline, SweepResult or None)."""
    from ..heads import sweep

    try:
        if not config.sweep:
            return pipeline.fit(X, y), None
        grid = sweep_grid(config, pipeline.named_steps["head"].get_params())
        return sweep(pipeline, X, y, grid, val_fraction=config.val_fraction, random_state=config.seed)
    except ValueError as e:  # invalid head parameters, as scikit-learn reports them
        raise FeatxError(f"cannot fit '{config.head}': {str(e).splitlines()[0]}") from None


def _sidecar(config, features, data: FitPlan, pipeline, metrics, sweep, fit_seconds, predict_seconds) -> dict:
    """head.json: what the head is, what it was fitted on and how it scored."""
    head = pipeline.named_steps["head"]
    return {
        "format": FORMAT,
        "head": config.head,
        "estimator": type(head).__name__,
        "params": jsonable(head.get_params()),
        "pipeline": [name for name, _ in pipeline.steps],
        "probability": "predict_proba" if hasattr(pipeline, "predict_proba") else "softmax of decision_function (uncalibrated)",
        "model_key": data.key,
        "features": str(Path(features).resolve()),
        "feature_dim": int(data.dim),
        "class_names": list(data.class_names),
        "classes_seen": [int(c) for c in pipeline.classes_],
        "backbone": {k: jsonable(data.attrs.get(k)) for k in BACKBONE_ATTRS},
        "train_split": data.train_split,
        "test_split": data.test_split,
        "holdout": data.holdout,
        "n_train": len(data.train_rows),
        "n_test": len(data.test_rows),
        "metrics": metrics,
        "fit_seconds": fit_seconds,
        "predict_seconds": predict_seconds,
        "sweep": sweep,
        "request": data.request,
        **provenance(),
    }
