"""``featx fit-head``: fit a head on a split of cached embeddings, test it once, save it with its provenance."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .configs import FitHeadConfig
from .errors import FeatxError
from .files import jsonable
from .head_folder import BACKBONE_ATTRS, FORMAT, check_head_folder, save_head
from .heads import HEADS, full_scores, grid_of, make_head
from .metrics import classification_metrics
from .provenance import provenance
from .splits import choose_splits, stratified_holdout
from .store import FeatureSet, FeatureStore

__all__ = ["FitHeadConfig", "FitHeadResult", "fit_head", "format_params"]

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

    def to_dict(self) -> dict:
        return {"head": self.head, "model": self.model, **self.metrics, "n_train": self.n_train, "n_test": self.n_test,
                "fit_seconds": self.fit_seconds, "predict_seconds": self.predict_seconds, "train_split": self.train_split,
                "test_split": self.test_split, "test_split_description": self.test_description,
                "sweep_best": self.sweep["best"] if self.sweep else None, "n_train_test_duplicates": self.n_train_test_duplicates,
                "out": str(self.out)}

    def summary(self) -> str:
        lines = [f"Head '{self.head}' on '{self.model}' features: trained on {self.n_train} rows of '{self.train_split}' "
                 f"in {self.fit_seconds:.2f} s, tested on {self.n_test} rows ({self.test_description})."]
        if self.sweep and self.sweep["curve"]:
            s = self.sweep
            curve = ", ".join(f"{format_params(c['params'])}: {c['val_accuracy']:.4f}" for c in s["curve"])
            lines.append(f"Sweep ({'one batched pass' if s['batched'] else 'one fit per value'}, {s['n_train']} train / "
                         f"{s['n_val']} validation rows, {s['seconds']:.2f} s): chose {format_params(s['best'])} "
                         f"(validation accuracy {s['best_val_accuracy']:.4f}); curve: {curve}")
        lines.append("  " + "  ".join(f"{k} {v:.4f}" for k, v in self.metrics.items()))
        lines.append(f"Saved to {self.out} (evaluate with 'featx evaluate {self.out} FEATURES.h5').")
        return "\n".join(lines)


def format_params(p: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


@dataclass
class _FitData:
    """The rows a head is fitted and tested on, and where they came from."""

    key: str
    attrs: dict
    request: dict
    train: FeatureSet
    test: FeatureSet
    train_split: str
    test_split: str | None
    holdout: dict | None  # {'split', 'fraction', 'seed'} when the test rows were held out of the training split
    test_description: str


def fit_head(features: str | os.PathLike, config: FitHeadConfig, out: str | os.PathLike) -> FitHeadResult:
    """Fit head ``config.head`` on the training split of ``features``, test it, save it to ``out``."""
    out = Path(out)
    pipeline = _pipeline(config)
    data = _fit_data(features, config, out)
    duplicates = data.train.count_shared_images(data.test)
    if duplicates:
        _logger.warning("%d of the %d test rows show an image that is also in the training rows (same file content); "
                        "their predictions are not a test (a kNN head scores them perfectly): remove the duplicates from one split",
                        duplicates, len(data.test))
    t0 = time.perf_counter()
    pipeline, sweep_result = _fit(pipeline, config, data.train)
    fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_classes = len(data.train.class_names)
    scores = full_scores(pipeline, data.test.X, n_classes)
    y_pred = np.asarray(pipeline.predict(data.test.X))
    predict_seconds = time.perf_counter() - t0
    metrics = classification_metrics(data.test.y, y_pred, scores, n_classes=n_classes)
    sweep = sweep_result.to_dict() if sweep_result else None
    meta = _sidecar(config, features, data, pipeline, metrics, sweep, fit_seconds, predict_seconds)
    save_head(out, pipeline, meta, overwrite=True)
    return FitHeadResult(out=out, head=config.head, model=data.key, metrics=metrics, n_train=len(data.train), n_test=len(data.test),
                         fit_seconds=fit_seconds, predict_seconds=predict_seconds, train_split=data.train_split,
                         test_split=data.test_split, test_description=data.test_description, sweep=sweep,
                         n_train_test_duplicates=duplicates)


def _head_params(config: FitHeadConfig) -> dict:
    """The head step's parameters: ``--param`` values and ``--class-weight``."""
    return {**config.params, **({"class_weight": config.class_weight} if config.class_weight is not None else {})}


def _pipeline(config: FitHeadConfig):
    if config.head not in HEADS:
        raise FeatxError(f"unknown head '{config.head}'; choose one of: {', '.join(HEADS)}")
    return make_head(config.head, standardize=config.standardize, l2_normalize=config.l2_normalize, pca=config.pca,
                     params=_head_params(config), random_state=config.seed, device=config.device)


def _fit_data(features, config: FitHeadConfig, out: Path) -> _FitData:
    """Read the training and test rows (checked), refusing an output folder that holds another head."""
    with FeatureStore(features) as store:
        key = store.resolve_key(config.model)
        train_split, test_split = choose_splits(store.split_names(key), train=config.train_split, test=config.test_split,
                                                labelled=store.labelled_splits(key), where=f"model '{key}' in '{features}'")
        attrs = store.attrs(key)
        request = {"head": config.head, "features": str(Path(features).resolve()), "model_key": key,
                   "weights_sha256": attrs.get("weights_sha256"), "standardize": config.standardize,
                   "l2_normalize": config.l2_normalize, "pca": config.pca, "params": jsonable(_head_params(config)), "sweep": config.sweep, "train_split": train_split,
                   "test_split": test_split, "seed": config.seed}
        check_head_folder(out, request, config.overwrite)
        train = store.read(key, train_split).require_finite(train_split).labelled("training", train_split)
        test = store.read(key, test_split).require_finite(test_split).labelled("test", test_split) if test_split else None
    holdout = None
    if test is None:
        if len(train) < 4:
            raise FeatxError(f"only {len(train)} labelled rows: too few to hold out a test set; extract more images or pass --test-split")
        if not 0 < config.test_fraction < 1:
            raise FeatxError(f"--test-fraction must be between 0 and 1, got {config.test_fraction}")
        tr, te = stratified_holdout(train.y, config.test_fraction, config.seed)
        train, test = train.subset(tr), train.subset(te)
        holdout = {"split": train_split, "fraction": config.test_fraction, "seed": config.seed}
        description = f"a seeded stratified {config.test_fraction:.0%} hold-out of '{train_split}'"
        _logger.info("no labelled test split: testing on %s", description)
    else:
        description = f"split '{test_split}'"
    _check_trainable(train, config)
    return _FitData(key, attrs, request, train, test, train_split, test_split, holdout, description)


def _check_trainable(train: FeatureSet, config: FitHeadConfig) -> None:
    present = np.unique(train.y)
    if len(present) < 2:
        raise FeatxError(f"the training split holds a single class ('{train.class_names[present[0]]}'); "
                         "a classifier needs images of at least two classes")
    if config.pca and config.pca > min(len(train), train.X.shape[1]):
        raise FeatxError(f"--pca {config.pca} exceeds min(training rows, feature dimension) = {min(len(train), train.X.shape[1])}")
    if config.head == "rbf-svm" and len(train) > 20000:
        _logger.warning("rbf-svm on %d rows is slow (cost grows with n^2); consider logreg or torch-linear", len(train))


def _fit(pipeline, config: FitHeadConfig, train: FeatureSet):
    """(fitted pipeline, SweepResult or None)."""
    from .heads import sweep

    try:
        if not config.sweep:
            return pipeline.fit(train.X, train.y), None
        swept = {k: v for k, v in HEADS[config.head].grid.items() if k not in config.params}  # values given with --param stay fixed
        grid = grid_of(config.head, swept) if swept else []
        if not grid:
            _logger.info("head '%s' has nothing to sweep with these options; fitted it as is", config.head)
        return sweep(pipeline, train.X, train.y, grid, val_fraction=config.val_fraction, random_state=config.seed)
    except ValueError as e:  # invalid head parameters, as scikit-learn reports them
        raise FeatxError(f"cannot fit '{config.head}': {str(e).splitlines()[0]}") from None


def _sidecar(config, features, data: _FitData, pipeline, metrics, sweep, fit_seconds, predict_seconds) -> dict:
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
        "feature_dim": int(data.train.X.shape[1]),
        "class_names": list(data.train.class_names),
        "classes_seen": [int(c) for c in pipeline.classes_],
        "backbone": {k: jsonable(data.attrs.get(k)) for k in BACKBONE_ATTRS},
        "train_split": data.train_split,
        "test_split": data.test_split,
        "holdout": data.holdout,
        "n_train": len(data.train),
        "n_test": len(data.test),
        "metrics": metrics,
        "fit_seconds": fit_seconds,
        "predict_seconds": predict_seconds,
        "sweep": sweep,
        "request": data.request,
        **provenance(),
    }
