"""Fitted heads on disk, and the library side of ``featx fit-head``, ``evaluate`` and ``predict``.

A head directory holds::

    head.json     sidecar: head, hyper-parameters, sweep, metrics, class names, feature dimension,
                  and the backbone that made the features (model, weights and their hash,
                  image size, data config, preprocessing, precision, pooling), so ``predict`` can
                  rebuild it and check it is the same
    head.joblib   scikit-learn heads (the whole Pipeline). joblib runs code when loading: only
                  load head directories from a trusted source.
    head.pt       torch heads: a plain state dict (preprocessing arrays and head weights),
                  read with ``torch.load(weights_only=True)``; the rest is in head.json

``featx evaluate`` adds ``evaluation-<split>.json`` and ``confusion-<split>.png``.
Directories are written beside the target and renamed into place, so a failed run never
leaves a half-written head or destroys the previous one.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from . import __version__
from .errors import FeatxError
from .heads import HEADS, MLPClassifier, TorchLinearClassifier, grid_of, make_head, predict_scores, sweep
from .metrics import classification_metrics, confusion, per_class_report
from .store import FeatureSet, FeatureStore

__all__ = [
    "FitHeadConfig", "FitHeadResult", "fit_head", "LoadedHead", "load_head", "save_head",
    "EvaluationResult", "evaluate_head", "PredictResult", "predict_images",
]

_logger = logging.getLogger(__name__)

SIDECAR = "head.json"
JOBLIB_FILE = "head.joblib"
TORCH_FILE = "head.pt"
FORMAT = "featx-head/1"
# Store attributes copied into the sidecar: what predict needs to rebuild and verify the backbone.
BACKBONE_ATTRS = ("model", "weights", "weights_sha256", "weights_file_sha256", "img_size", "data_config", "preprocessing",
                  "geometry", "precision", "pooling", "dtype", "num_features", "image_list_sha256", "source")
TEST_SPLIT_NAMES = ("test", "testing", "val", "valid", "validation", "dev", "holdout")
_TORCH_HEADS = {"TorchLinearClassifier": TorchLinearClassifier, "MLPClassifier": MLPClassifier}


# -- checks on features ------------------------------------------------------------------------
def _labelled(fs: FeatureSet, role: str, split: str) -> FeatureSet:
    """``fs`` without unlabeled rows (label -1); an error when no row is labelled."""
    mask = fs.y >= 0
    if not mask.any():
        raise FeatxError(
            f"the {role} split '{split}' of '{fs.key}' has no labels (label -1 = unlabeled); "
            "extract labelled images (a <class>/<image> folder or a CSV manifest with a label column)"
        )
    if not mask.all():
        _logger.warning("ignoring %d unlabeled rows of the %s split '%s'", int((~mask).sum()), role, split)
        fs = _take_rows(fs, np.flatnonzero(mask))
    return fs


def _finite(fs: FeatureSet, split: str) -> None:
    bad = np.flatnonzero(~np.isfinite(fs.X).all(axis=1))
    if len(bad):
        shown = ", ".join(str(i) for i in fs.ids[bad[:3]])
        raise FeatxError(
            f"{len(bad)} feature rows of '{fs.key}' (split '{split}') hold NaN or infinite values (e.g. {shown}); "
            "re-extract with 'featx extract ... --dtype float32 --precision fp32 --overwrite'"
        )


def _take_rows(fs: FeatureSet, idx: np.ndarray) -> FeatureSet:
    return FeatureSet(X=fs.X[idx], y=fs.y[idx], ids=fs.ids[idx], splits=fs.splits[idx], class_names=fs.class_names,
                      key=fs.key, attrs=fs.attrs)


def holdout_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): a seeded, stratified hold-out of ``fraction`` (plain when a class is too rare)."""
    if not 0 < fraction < 1:
        raise FeatxError(f"--test-fraction must be between 0 and 1, got {fraction}")
    idx = np.arange(len(y))
    counts = np.unique(y, return_counts=True)[1]
    n_test = int(math.ceil(len(y) * fraction))
    stratify = y if counts.min() >= 2 and n_test >= len(counts) and len(y) - n_test >= len(counts) else None
    if len(y) < 4:
        raise FeatxError(f"only {len(y)} labelled rows: too few to hold out a test set; extract more images or pass --test-split")
    tr, te = train_test_split(idx, test_size=n_test, random_state=seed, stratify=stratify)
    return np.sort(tr), np.sort(te)


def full_scores(pipeline, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Scores [n, n_classes] in class-index order (classes unseen in training get 0)."""
    p = predict_scores(pipeline, X)
    out = np.zeros((len(X), n_classes), dtype=np.float64)
    out[:, np.asarray(pipeline.classes_, dtype=np.int64)] = p
    return out


def _json_value(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


# -- fit-head ----------------------------------------------------------------------------------
@dataclass
class FitHeadConfig:
    """Options of ``featx fit-head``; ``None`` means the head's or the store's default."""

    head: str  # one of featx.heads.HEADS
    model: str | None = None  # group key in the store (default: its only one)
    train_split: str | None = None  # default: 'train' (or the only split)
    test_split: str | None = None  # default: 'test'/'val'/...; none: a held-out fraction of the training split
    sweep: bool = False  # choose the regularisation on a validation split
    standardize: bool | None = None  # None: the head's default
    l2_normalize: bool | None = None  # None: the head's default
    pca: int | None = None  # reduce to this many dimensions first
    params: dict = field(default_factory=dict)  # head parameters (e.g. {'C': 0.1})
    class_weight: str | None = None  # 'balanced' for imbalanced classes
    device: str = "auto"  # torch heads: auto | cpu | cuda[:N]
    test_fraction: float = 0.2  # held-out share when the store has a single split
    val_fraction: float = 0.2  # validation share carved from training rows by --sweep
    seed: int = 0
    overwrite: bool = False  # replace a different head already in the output folder


@dataclass
class FitHeadResult:
    """What ``fit_head`` did; ``to_json`` is the ``--json`` line."""

    out: Path
    head: str
    model: str
    metrics: dict
    n_train: int
    n_test: int
    fit_seconds: float
    predict_seconds: float
    train_split: str
    test_split: str  # split name, or 'holdout of <split>'
    sweep: dict | None = None
    params: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"head": self.head, "model": self.model, **self.metrics, "n_train": self.n_train, "n_test": self.n_test,
                "fit_seconds": self.fit_seconds, "predict_seconds": self.predict_seconds, "train_split": self.train_split,
                "test_split": self.test_split, "sweep_best": self.sweep["best"] if self.sweep else None, "out": str(self.out)}

    def summary(self) -> str:
        m = self.metrics
        lines = [f"Head '{self.head}' on '{self.model}' features: trained on {self.n_train} rows of '{self.train_split}' "
                 f"in {self.fit_seconds:.2f} s, tested on {self.n_test} rows ({self.test_split})."]
        if self.sweep:
            curve = ", ".join(f"{_fmt_params(c['params'])}: {c['val_accuracy']:.4f}" for c in self.sweep["curve"])
            lines.append(f"Sweep ({'one batched pass' if self.sweep['batched'] else 'one fit per value'}, "
                         f"{self.sweep['n_train']} train / {self.sweep['n_val']} validation rows, {self.sweep['seconds']:.2f} s): "
                         f"chose {_fmt_params(self.sweep['best'])} (validation accuracy {self.sweep['best_val_accuracy']:.4f}); "
                         f"curve: {curve}")
        lines.append("  " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
        lines.append(f"Saved to {self.out} (evaluate with 'featx evaluate {self.out} FEATURES.h5').")
        return "\n".join(lines)


def _fmt_params(p: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


def _pick_split(splits: list[str], preferred: tuple[str, ...]) -> str | None:
    lower = {s.lower(): s for s in splits}
    for name in preferred:
        if name in lower:
            return lower[name]
    return None


def fit_head(features: str | os.PathLike, config: FitHeadConfig, out: str | os.PathLike) -> FitHeadResult:
    """Fit head ``config.head`` on the training split of ``features``, test it, save it to ``out``."""
    out = Path(out)
    if config.head not in HEADS:
        raise FeatxError(f"unknown head '{config.head}'; choose one of: {', '.join(HEADS)}")
    params = dict(config.params)
    if config.class_weight is not None:
        params["class_weight"] = config.class_weight
    pipeline = make_head(config.head, standardize=config.standardize, l2_normalize=config.l2_normalize, pca=config.pca,
                         params=params, random_state=config.seed, device=config.device)
    with FeatureStore(features) as store:
        key = store.resolve_key(config.model)
        splits = store.split_names(key)
        train_split = config.train_split or _pick_split(splits, ("train", "training")) or splits[0]
        if train_split not in splits:
            raise FeatxError(f"model '{key}' in '{features}' has no split '{train_split}'; it has: {', '.join(splits)}")
        test_split = config.test_split or _pick_split([s for s in splits if s != train_split], TEST_SPLIT_NAMES)
        if test_split is not None and test_split not in splits:
            raise FeatxError(f"model '{key}' in '{features}' has no split '{test_split}'; it has: {', '.join(splits)}")
        if test_split == train_split:
            raise FeatxError(f"--train-split and --test-split are both '{train_split}'; choose different splits "
                             "(or leave --test-split out to hold out a fraction of the training split)")
        attrs = store.attrs(key)
        request = {"head": config.head, "features": str(Path(features).resolve()), "model_key": key,
                   "weights_sha256": attrs.get("weights_sha256"), "standardize": config.standardize,
                   "l2_normalize": config.l2_normalize, "pca": config.pca, "params": _json_value(params),
                   "sweep": config.sweep, "train_split": train_split, "test_split": test_split, "seed": config.seed}
        _check_out(out, request, config.overwrite)
        train = store.read(key, train_split)
        test = store.read(key, test_split) if test_split else None
    _finite(train, train_split)
    train = _labelled(train, "training", train_split)
    holdout = None
    if test is None:
        tr, te = holdout_split(train.y, config.test_fraction, config.seed)
        train, test = _take_rows(train, tr), _take_rows(train, te)
        holdout = {"split": train_split, "fraction": config.test_fraction, "seed": config.seed}
        test_desc = f"a seeded stratified {config.test_fraction:.0%} hold-out of '{train_split}'"
        _logger.info("the store has no test split: testing on %s", test_desc)
    else:
        _finite(test, test_split)
        test = _labelled(test, "test", test_split)
        test_desc = f"split '{test_split}'"
    n_classes = len(train.class_names)
    present = np.unique(train.y)
    if len(present) < 2:
        raise FeatxError(f"the training split '{train_split}' holds a single class ('{train.class_names[present[0]]}'); "
                         "a classifier needs images of at least two classes")
    if config.pca and config.pca > min(len(train), train.X.shape[1]):
        raise FeatxError(f"--pca {config.pca} exceeds min(training rows, feature dimension) = {min(len(train), train.X.shape[1])}")
    warnings = []
    if config.head == "rbf-svm" and len(train) > 20000:
        warnings.append(f"rbf-svm on {len(train)} rows is slow (cost grows with n^2); consider logreg or torch-linear")
        _logger.warning("%s", warnings[-1])
    t0 = time.perf_counter()
    sweep_result = None
    try:
        if config.sweep:
            swept = {k: v for k, v in HEADS[config.head].grid.items() if k not in params}  # values given with --param stay fixed
            grid = grid_of(config.head, swept) if swept else []
            pipeline, sweep_result = sweep(pipeline, train.X, train.y, grid, val_fraction=config.val_fraction,
                                           random_state=config.seed)
            if not grid:
                _logger.info("head '%s' has nothing to sweep with these options; fitted it as is", config.head)
        else:
            pipeline.fit(train.X, train.y)
    except ValueError as e:  # invalid head parameters, as scikit-learn reports them
        raise FeatxError(f"cannot fit '{config.head}': {str(e).splitlines()[0]}") from None
    fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = full_scores(pipeline, test.X, n_classes)
    y_pred = np.asarray(pipeline.predict(test.X))
    predict_seconds = time.perf_counter() - t0
    metrics = classification_metrics(test.y, y_pred, scores, n_classes=n_classes)
    head_params = _json_value(pipeline.named_steps["head"].get_params())
    meta = {
        "format": FORMAT,
        "head": config.head,
        "estimator": type(pipeline.named_steps["head"]).__name__,
        "params": head_params,
        "pipeline": [name for name, _ in pipeline.steps],
        "probability": "predict_proba" if hasattr(pipeline, "predict_proba") else "softmax of decision_function (uncalibrated)",
        "model_key": key,
        "features": str(Path(features).resolve()),
        "feature_dim": int(train.X.shape[1]),
        "class_names": list(train.class_names),
        "classes_seen": [int(c) for c in pipeline.classes_],
        "backbone": {k: _json_value(attrs.get(k)) for k in BACKBONE_ATTRS},
        "train_split": train_split,
        "test_split": test_split,
        "holdout": holdout,
        "n_train": len(train),
        "n_test": len(test),
        "metrics": metrics,
        "fit_seconds": fit_seconds,
        "predict_seconds": predict_seconds,
        "sweep": sweep_result.to_dict() if sweep_result else None,
        "request": request,
        "featx_version": __version__,
        "versions": {"scikit-learn": sklearn.__version__, "torch": str(torch.__version__), "numpy": np.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_head(out, pipeline, meta, overwrite=True)
    return FitHeadResult(out=out, head=config.head, model=key, metrics=metrics, n_train=len(train), n_test=len(test),
                         fit_seconds=fit_seconds, predict_seconds=predict_seconds, train_split=train_split, test_split=test_desc,
                         sweep=meta["sweep"], params=head_params, warnings=warnings)


# -- the head directory ------------------------------------------------------------------------
def _read_sidecar(path: Path) -> dict:
    try:
        meta = json.loads((path / SIDECAR).read_text())
    except FileNotFoundError:
        raise FeatxError(f"'{path}' holds no featx head ({SIDECAR} missing); create one with 'featx fit-head FEATURES.h5 --head NAME --out {path}'") from None
    except (OSError, json.JSONDecodeError) as e:
        raise FeatxError(f"cannot read '{path / SIDECAR}': {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FeatxError(f"'{path / SIDECAR}' is not a {FORMAT} head sidecar")
    return meta


def _check_out(out: Path, request: dict, overwrite: bool) -> None:
    """Refuse an output that is a file, a foreign non-empty folder, or a folder holding a different head."""
    if out.exists() and not out.is_dir():
        raise FeatxError(f"--out '{out}' exists and is not a folder; choose a new folder for the head")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / SIDECAR).exists():
        raise FeatxError(f"--out '{out}' is a non-empty folder that holds no featx head; choose a new or empty folder")
    try:
        old = json.loads((out / SIDECAR).read_text())
    except (OSError, json.JSONDecodeError):
        old = {}
    if old.get("request") != request and not overwrite:
        what = f"'{old.get('head', '?')}' on '{old.get('model_key', '?')}' features from {old.get('features', '?')}"
        raise FeatxError(f"--out '{out}' already holds a different head ({what}); pass --overwrite to replace it or choose another --out")


def _pipeline_state(pipeline: Pipeline) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Preprocessing steps as JSON specs plus arrays, so torch heads load without pickle."""
    steps, tensors = [], {}
    for name, step in pipeline.steps[:-1]:
        if isinstance(step, Normalizer):
            steps.append({"name": name, "type": "Normalizer", "norm": step.norm})
        elif isinstance(step, StandardScaler):
            steps.append({"name": name, "type": "StandardScaler", "n_samples_seen": int(np.max(step.n_samples_seen_))})
            tensors[f"pre.{name}.mean"] = torch.from_numpy(np.asarray(step.mean_, np.float64))
            tensors[f"pre.{name}.scale"] = torch.from_numpy(np.asarray(step.scale_, np.float64))
        elif isinstance(step, PCA):
            steps.append({"name": name, "type": "PCA", "whiten": bool(step.whiten)})
            for attr in ("components_", "mean_", "explained_variance_", "explained_variance_ratio_", "singular_values_"):
                tensors[f"pre.{name}.{attr}"] = torch.from_numpy(np.asarray(getattr(step, attr), np.float64))
        else:
            raise AssertionError(f"no tensor serialisation for preprocessing step {type(step).__name__}")
    return steps, tensors


def _rebuild_step(spec: dict, state: dict[str, torch.Tensor], dim: int):
    name = spec["name"]

    def arr(attr):
        return state[f"pre.{name}.{attr}"].numpy()

    if spec["type"] == "Normalizer":
        step = Normalizer(norm=spec["norm"])
        step.n_features_in_ = dim
    elif spec["type"] == "StandardScaler":
        step = StandardScaler()
        step.mean_, step.scale_ = arr("mean"), arr("scale")
        step.var_ = step.scale_**2
        step.n_samples_seen_ = spec["n_samples_seen"]
        step.n_features_in_ = dim
    elif spec["type"] == "PCA":
        components = arr("components_")
        step = PCA(n_components=components.shape[0], whiten=spec["whiten"])
        for attr in ("components_", "mean_", "explained_variance_", "explained_variance_ratio_", "singular_values_"):
            setattr(step, attr, arr(attr))
        step.n_components_ = components.shape[0]
        step.n_features_in_ = dim
        step.noise_variance_ = 0.0
    else:
        raise FeatxError(f"unknown preprocessing step '{spec['type']}' in head sidecar")
    return step


def save_head(out: str | os.PathLike, pipeline: Pipeline, meta: dict, *, overwrite: bool = False) -> Path:
    """Write ``pipeline`` and its sidecar ``meta`` into the folder ``out`` (atomically replaced)."""
    out = Path(out)
    _check_out(out, meta.get("request"), overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        head = pipeline.named_steps["head"]
        meta = dict(meta)
        if isinstance(head, (TorchLinearClassifier, MLPClassifier)):
            steps, tensors = _pipeline_state(pipeline)
            tensors.update({f"head.{k}": v.contiguous() for k, v in head.state_tensors().items()})
            torch.save(tensors, tmp / TORCH_FILE)
            meta["serialization"] = {"type": "torch-state-dict", "file": TORCH_FILE, "steps": steps,
                                     "classes": [_json_value(c) for c in head.classes_], "learned": head.learned_extra()}
        else:
            import joblib

            joblib.dump(pipeline, tmp / JOBLIB_FILE)
            meta["serialization"] = {"type": "joblib", "file": JOBLIB_FILE}
        (tmp / SIDECAR).write_text(json.dumps(_json_value(meta), indent=2) + "\n")
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass
class LoadedHead:
    """A fitted head read back from its folder."""

    path: Path
    pipeline: Pipeline
    meta: dict

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]

    def check_features(self, attrs: dict, key: str, dim: int, where: str) -> None:
        """Raise :class:`FeatxError` naming every difference between these features and the head's."""
        bb = self.meta["backbone"]
        diffs = []
        if attrs.get("model") != bb.get("model"):
            diffs.append(f"model '{attrs.get('model')}' vs the head's '{bb.get('model')}'")
        if attrs.get("weights_sha256") != bb.get("weights_sha256"):
            diffs.append(f"weights {str(attrs.get('weights_sha256'))[:12]}... vs the head's {str(bb.get('weights_sha256'))[:12]}...")
        if dim != self.meta["feature_dim"]:
            diffs.append(f"dimension {dim} vs the head's {self.meta['feature_dim']}")
        if diffs:
            raise FeatxError(f"features '{key}' in {where} do not match head '{self.path}' (fitted on '{self.meta['model_key']}'): "
                             + "; ".join(diffs) + ". Use features of the same backbone, or fit a new head on these")
        for k in ("img_size", "preprocessing", "precision", "pooling"):
            if str(attrs.get(k)) != str(bb.get(k)):
                _logger.warning("features '%s' differ from the head's in %s (%s vs %s); results may shift", key, k, attrs.get(k), bb.get(k))

    def scores(self, X: np.ndarray) -> np.ndarray:
        return full_scores(self.pipeline, X, len(self.class_names))


def load_head(path: str | os.PathLike) -> LoadedHead:
    """Read a head folder written by ``featx fit-head``. joblib heads must come from a trusted source."""
    path = Path(path)
    if not path.is_dir():
        raise FeatxError(f"head folder '{path}' does not exist; create it with 'featx fit-head FEATURES.h5 --head NAME --out {path}'")
    meta = _read_sidecar(path)
    ser = meta.get("serialization", {})
    file = path / ser.get("file", "")
    if not file.is_file():
        raise FeatxError(f"head folder '{path}' lacks its weights file '{ser.get('file')}'; refit the head")
    if ser.get("type") == "joblib":
        import joblib

        pipeline = joblib.load(file)
    elif ser.get("type") == "torch-state-dict":
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise FeatxError(f"cannot read '{file}': {str(e).splitlines()[0][:200]}") from None
        dim = int(meta["feature_dim"])
        steps = [(s["name"], _rebuild_step(s, state, dim)) for s in ser["steps"]]
        cls = _TORCH_HEADS.get(meta["estimator"])
        if cls is None:
            raise FeatxError(f"unknown torch head '{meta['estimator']}' in '{path / SIDECAR}'")
        head = cls(**meta["params"])
        head_state = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        head.load_state_tensors(head_state, np.asarray(ser["classes"]), ser.get("learned", {}))
        pipeline = Pipeline(steps + [("head", head)])
    else:
        raise FeatxError(f"unknown serialization '{ser.get('type')}' in '{path / SIDECAR}'")
    return LoadedHead(path=path, pipeline=pipeline, meta=meta)


# -- evaluate ----------------------------------------------------------------------------------
@dataclass
class EvaluationResult:
    """Metrics of a head on one split, and where they were written."""

    head: str
    model: str
    split: str
    n: int
    metrics: dict
    per_class: list[dict]
    confusion: list[list[int]]
    class_names: list[str]
    json_path: Path
    png_path: Path

    def to_json(self) -> dict:
        return {"head": self.head, "model": self.model, "split": self.split, "n": self.n, **self.metrics,
                "json": str(self.json_path), "png": str(self.png_path)}

    def summary(self) -> str:
        width = max(12, *(len(c["class"]) for c in self.per_class))
        lines = [f"Head '{self.head}' on {self.n} rows of '{self.model}' ({self.split}):",
                 "  " + "  ".join(f"{k} {v:.4f}" for k, v in self.metrics.items()),
                 f"  {'class':<{width}} precision  recall     f1  support"]
        lines += [f"  {c['class']:<{width}} {c['precision']:9.4f} {c['recall']:7.4f} {c['f1']:6.4f} {c['support']:8d}" for c in self.per_class]
        lines.append(f"Wrote {self.json_path} and {self.png_path}.")
        return "\n".join(lines)


def evaluate_head(head_dir: str | os.PathLike, features: str | os.PathLike, *, split: str | None = None,
                  model: str | None = None, out_dir: str | os.PathLike | None = None) -> EvaluationResult:
    """Metrics, per-class report and confusion matrix of a saved head on a split of ``features``.

    Without ``split``: the head's test split, or the same seeded hold-out it was tested on.
    """
    head = load_head(head_dir)
    meta = head.meta
    with FeatureStore(features) as store:
        key = store.resolve_key(model or meta["model_key"])
        attrs = store.attrs(key)
        head.check_features(attrs, key, int(attrs.get("num_features", meta["feature_dim"])), f"'{features}'")
        rows = None
        if split is None:
            if meta.get("test_split"):
                split = meta["test_split"]
            elif meta.get("holdout") and attrs.get("image_list_sha256") == meta["backbone"].get("image_list_sha256"):
                split = meta["holdout"]["split"]
                fs = store.read(key, split)
                labelled = np.flatnonzero(fs.y >= 0)
                rows = labelled[holdout_split(fs.y[labelled], meta["holdout"]["fraction"], meta["holdout"]["seed"])[1]]
            else:
                raise FeatxError(f"the head was tested on a hold-out of another image list; choose a split of '{features}' with --split "
                                 f"({', '.join(store.split_names(key))})")
        fs = store.read(key, split)
    if rows is not None:
        fs = _take_rows(fs, rows)
        label = f"hold-out of '{split}'"
    else:
        label = f"split '{split}'"
    _finite(fs, split)
    fs = _labelled(fs, "evaluation", split)
    head.check_features(attrs, key, fs.X.shape[1], f"'{features}'")
    names = head.class_names
    if fs.class_names != names:
        raise FeatxError(f"the class names of '{key}' in '{features}' differ from the head's ({', '.join(fs.class_names[:5])} ... vs "
                         f"{', '.join(names[:5])} ...); evaluate on features of the same labelled image set")
    scores = head.scores(fs.X)
    y_pred = np.asarray(head.pipeline.predict(fs.X))
    metrics = classification_metrics(fs.y, y_pred, scores, n_classes=len(names))
    report = per_class_report(fs.y, y_pred, names)
    cm = confusion(fs.y, y_pred, len(names))
    out_dir = Path(out_dir) if out_dir else Path(head_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in (f"{split}-holdout" if rows is not None else split))
    json_path, png_path = out_dir / f"evaluation-{tag}.json", out_dir / f"confusion-{tag}.png"
    result = EvaluationResult(head=meta["head"], model=key, split=label, n=len(fs), metrics=metrics, per_class=report,
                              confusion=cm.tolist(), class_names=names, json_path=json_path, png_path=png_path)
    doc = {**result.to_json(), "features": str(Path(features).resolve()), "head_dir": str(Path(head_dir).resolve()),
           "per_class": report, "confusion_matrix": cm.tolist(), "class_names": names, "featx_version": __version__,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_text_atomic(json_path, json.dumps(doc, indent=2) + "\n")
    _plot_confusion(cm, names, f"{meta['head']} on {key} ({label}): accuracy {metrics['accuracy']:.3f}", png_path)
    return result


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plot_confusion(cm: np.ndarray, names: list[str], title: str, path: Path) -> None:
    """Row-normalised confusion matrix with counts, as a PNG (Agg canvas; no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(names)
    size = min(4 + 0.45 * n, 24)
    fig = Figure(figsize=(size + 1.5, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), names, rotation=90 if n > 6 else 0, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


# -- predict -----------------------------------------------------------------------------------
@dataclass
class PredictResult:
    """What ``predict_images`` wrote."""

    out: Path
    n_images: int
    n_predicted: int
    unreadable: list[tuple[str, str]]  # (path, reason)
    seconds: float
    accuracy: float | None = None  # when the source carries labels

    def summary(self) -> str:
        text = f"Predicted {self.n_predicted} of {self.n_images} images in {self.seconds:.1f} s into {self.out}"
        if self.accuracy is not None:
            text += f" (accuracy on the source's labels: {self.accuracy:.4f})"
        if self.unreadable:
            text += f"; {len(self.unreadable)} unreadable, listed with an empty label and the reason in the 'error' column"
        return text + "."


def predict_images(head_dir: str | os.PathLike, source, out: str | os.PathLike, *, device: str = "auto", batch_size: int = 64,
                   workers: int | None = None, weights: str | None = None, progress: bool = True) -> PredictResult:
    """Embed the images of ``source`` with the head's backbone (same weights, same preprocessing) and
    write ``path,label,probability,error[,true_label]`` per image to the CSV ``out``.

    Unreadable images get a row with an empty label and the reason in ``error``; they never stop the run.
    ``weights`` points at the checkpoint when it has moved; its hash must still match the head's.
    """
    from tqdm.auto import tqdm

    from .backbones import create_backbone
    from .extract import iter_embeddings, resolve_device
    from .preprocess import Geometry, eval_transform
    from .sources import ImageSource, resolve_source

    t0 = time.perf_counter()
    out = Path(out)
    if out.is_dir():
        raise FeatxError(f"--out '{out}' is a folder; pass a CSV file path such as {out / 'predictions.csv'}")
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise FeatxError(f"cannot write --out '{out}': folder '{out.parent}' does not exist")
    head = load_head(head_dir)
    bb = head.meta["backbone"]
    src = source if isinstance(source, ImageSource) else resolve_source(source)
    recorded = bb.get("weights") or "random"
    ckpt = weights or (None if recorded in ("random", "timm-pretrained") else recorded)
    if ckpt is not None and not Path(ckpt).is_file():
        raise FeatxError(f"the checkpoint the head's features came from, '{ckpt}', does not exist; pass its new location with --weights PATH")
    model, info = create_backbone(bb["model"], pretrained=recorded == "timm-pretrained" and weights is None, weights=ckpt,
                                  img_size=bb.get("img_size"))
    if info.weights_sha256 != bb.get("weights_sha256"):
        raise FeatxError(
            f"the backbone weights ({info.weights}) hash to {info.weights_sha256[:12]}..., but head '{head_dir}' was fitted on "
            f"features of weights {str(bb.get('weights_sha256'))[:12]}...; restore the original checkpoint or refit the head "
            "on features of these weights"
        )
    data_config, transform = eval_transform(model, bb.get("img_size"))
    if bb.get("data_config") and json.dumps(data_config, sort_keys=True, default=list) != bb["data_config"]:
        raise FeatxError(f"rebuilt preprocessing {json.dumps(data_config, default=list)} differs from the recorded {bb['data_config']}; "
                         "use the timm version the features were extracted with")
    mode = json.loads(bb.get("preprocessing") or "{}").get("mode", "host")
    geometry = Geometry.from_transform(transform) if mode == "device" else None
    dev = resolve_device(device)
    precision = bb.get("precision") or "fp32"
    if precision == "fp16" and dev.type == "cpu":
        _logger.warning("features were computed in fp16, which this CPU cannot run; using fp32 (predictions may differ slightly)")
        precision = "fp32"
    n = len(src)
    feats = np.empty((n, int(head.meta["feature_dim"])), np.float32)
    done = np.zeros(n, dtype=bool)
    reasons: dict[int, str] = {}
    with tqdm(total=n, unit="img", desc="predict", disable=not progress) as bar:
        for f, ok, bad, _ in iter_embeddings(src, model, transform, device=dev, precision=precision, batch_size=batch_size,
                                             preprocess=mode, geometry=geometry, workers=workers):
            if len(ok):
                if f.shape[1] != feats.shape[1]:
                    raise FeatxError(f"the backbone gives {f.shape[1]}-dimensional features, the head expects {feats.shape[1]}")
                feats[ok] = f
                done[ok] = True
            reasons.update(dict(bad))
            bar.update(len(ok) + len(bad))
    assert done.sum() + len(reasons) == n, "every image must have a feature row or a reason"
    if bb.get("dtype") == "float16":
        feats = feats.astype(np.float16).astype(np.float32)  # as the head saw its training features
    ok_idx = np.flatnonzero(done)
    finite = np.isfinite(feats[ok_idx]).all(axis=1)
    for i in ok_idx[~finite]:
        reasons[int(i)] = "embedding is NaN or infinite"
    ok_idx = ok_idx[finite]
    names = head.class_names
    labels = np.full(n, -1, dtype=np.int64)
    probs = np.full(n, np.nan)
    if len(ok_idx):
        s = head.scores(feats[ok_idx])
        labels[ok_idx] = s.argmax(axis=1)
        probs[ok_idx] = s.max(axis=1)
    has_truth = bool((src.labels >= 0).any()) and list(src.class_names) == list(names)
    paths = [str(src.path(i)) if src.path(i) is not None else src.ids[i] for i in range(n)]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "probability", "error"] + (["true_label"] if has_truth else []))
        for i in range(n):
            row = [paths[i], names[labels[i]] if labels[i] >= 0 else "", f"{probs[i]:.6f}" if labels[i] >= 0 else "", reasons.get(i, "")]
            if has_truth:
                row.append(names[src.labels[i]] if src.labels[i] >= 0 else "")
            w.writerow(row)
    os.replace(tmp, out)
    unreadable = [(paths[i], reasons[i]) for i in sorted(reasons)]
    if unreadable:
        shown = "; ".join(f"{p}: {r}" for p, r in unreadable[:10])
        _logger.warning("%d images could not be read (empty label in the CSV): %s%s", len(unreadable), shown,
                        "; ..." if len(unreadable) > 10 else "")
    accuracy = None
    if has_truth:
        m = (src.labels >= 0) & (labels >= 0)
        accuracy = float((src.labels[m] == labels[m]).mean()) if m.any() else None
    return PredictResult(out=out, n_images=n, n_predicted=len(ok_idx), unreadable=unreadable, seconds=time.perf_counter() - t0,
                         accuracy=accuracy)
