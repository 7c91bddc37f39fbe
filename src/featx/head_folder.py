"""Head folders on disk: what ``featx fit-head`` saves and ``evaluate``, ``predict`` and ``finetune`` load.

A head folder holds::

    head.json     sidecar: head, hyper-parameters, sweep, metrics, class names, feature dimension,
                  and the backbone that made the features (model, weights and their hash,
                  image size, data config, preprocessing, precision, pooling), so ``predict`` can
                  rebuild it and check it is the same
    head.joblib   scikit-learn heads (the whole Pipeline). joblib runs code when loading: only
                  load head folders from a trusted source.
    head.pt       torch heads: a plain state dict (preprocessing arrays and head weights),
                  read with ``torch.load(weights_only=True)``; the rest is in head.json
    test_predictions.csv  id,true,predicted of every test image (class names), so paired tests
                  (``featx compare``'s McNemar test) need no refit and no features

Folders are written beside the target and renamed into place, so a failed run never leaves a
half-written head or destroys the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from .errors import FeatxError, load_failure, shell_command
from .files import jsonable, replace_folder, write_json_atomic
from .heads import full_scores, is_torch_head
from .heads._registry import torch_head_class
from .images import looks_like_image_folder

if TYPE_CHECKING:  # torch and scikit-learn are imported where heads are written or read, not to check a folder or read its sidecar
    import torch
    from sklearn.pipeline import Pipeline

__all__ = ["SIDECAR", "FORMAT", "BACKBONE_ATTRS", "LoadedHead", "load_head", "read_head_meta", "save_head",
           "check_head_folder", "PREDICTIONS", "predictions_csv", "read_predictions"]

_logger = logging.getLogger(__name__)

SIDECAR = "head.json"
JOBLIB_FILE = "head.joblib"
TORCH_FILE = "head.pt"
PREDICTIONS = "test_predictions.csv"
FORMAT = "featx-head/1"
# Store attributes copied into the sidecar: what predict needs to rebuild and verify the backbone.
BACKBONE_ATTRS = ("model", "weights", "weights_sha256", "weights_file_sha256", "weights_load", "img_size", "data_config", "preprocessing",
                  "geometry", "precision", "pooling", "dtype", "num_features", "image_list_sha256", "source", "layers", "tta", "taps",
                  "runtime")


def _read_sidecar(path: Path) -> dict:
    try:
        meta = json.loads((path / SIDECAR).read_text())
    except FileNotFoundError:
        raise FeatxError(_not_a_head(path)) from None
    except (OSError, json.JSONDecodeError) as e:
        raise FeatxError(f"cannot read '{path / SIDECAR}': {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FeatxError(f"'{path / SIDECAR}' is not a {FORMAT} head sidecar")
    return meta


def _not_a_head(path: Path) -> str:
    """Why ``path`` is not a head folder, suggesting a command that writes one only where that is safe."""
    made_by = shell_command("featx", "fit-head", "FEATURES.h5", "--head", "NAME", "--out", "HEAD_DIR")
    if looks_like_image_folder(path):
        return (f"'{path}' is an image folder, not a head folder; HEAD_DIR, the folder '{made_by}' wrote, comes first "
                "(featx predict HEAD_DIR SOURCE, featx evaluate HEAD_DIR FEATURES.h5)")
    if path.is_file():
        return f"'{path}' is a file, not a head folder; pass the folder '{made_by}' wrote (HEAD_DIR comes first)"
    if path.is_dir() and any(path.iterdir()):
        return f"'{path}' holds no featx head ({SIDECAR} missing); pass the folder '{made_by}' wrote"
    command = shell_command("featx", "fit-head", "FEATURES.h5", "--head", "NAME", "--out", path)
    return f"head folder '{path}' {'is empty' if path.is_dir() else 'does not exist'}; create it with '{command}'"


def check_head_folder(out: Path, request: dict, overwrite: bool) -> None:
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
    import torch
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import Normalizer, StandardScaler

    steps, tensors = [], {}
    for name, step in pipeline.steps[:-1]:
        if isinstance(step, Normalizer):
            steps.append({"name": name, "type": "Normalizer", "norm": step.norm})
        elif type(step).__name__ == "TapNormalizer":
            steps.append({"name": name, "type": "TapNormalizer", "blocks": None if step.blocks is None else [list(b) for b in step.blocks]})
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
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import Normalizer, StandardScaler

    name = spec["name"]

    def arr(attr):
        return state[f"pre.{name}.{attr}"].numpy()

    if spec["type"] == "TapNormalizer":
        from .heads._taps import TapNormalizer

        step = TapNormalizer(None if spec["blocks"] is None else tuple(tuple(b) for b in spec["blocks"]))
        step.n_features_in_ = dim
    elif spec["type"] == "Normalizer":
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


def predictions_csv(ids, true, predicted) -> str:
    """``id,true,predicted`` rows (class names), as ``test_predictions.csv`` holds them."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "true", "predicted"])
    w.writerows(zip(ids, true, predicted))
    return buf.getvalue()


def read_predictions(path: str | os.PathLike, predicted: tuple[str, ...] = ("predicted",),
                     true: tuple[str, ...] = ("true",)) -> dict[str, bool] | None:
    """{image id: prediction right} from a predictions CSV with an ``id`` column, a true-label column (the first of ``true``
    it has) and a prediction column (the first of ``predicted``); None when the file is missing or lacks them."""
    import csv

    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return None
    columns = set(rows[0]) if rows else set()
    t = next((c for c in true if c in columns), None)
    p = next((c for c in predicted if c in columns), None)
    if "id" not in columns or t is None or p is None:
        return None
    return {r["id"]: r[t] == r[p] for r in rows}


def save_head(out: str | os.PathLike, pipeline: Pipeline, meta: dict, *, overwrite: bool = False,
              files: dict[str, str] | None = None) -> Path:
    """Write ``pipeline``, its sidecar ``meta`` and the text ``files`` ({name: text}) into the folder ``out`` (atomically replaced)."""
    out = Path(out)
    check_head_folder(out, meta.get("request"), overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        meta = {**meta, "serialization": _write_estimator(pipeline, tmp)}
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        write_json_atomic(tmp / SIDECAR, meta)
        replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_estimator(pipeline: Pipeline, folder: Path) -> dict:
    """Save the fitted pipeline into ``folder``; returns the sidecar's ``serialization`` entry."""
    head = pipeline.named_steps["head"]
    if is_torch_head(head):
        import torch

        steps, tensors = _pipeline_state(pipeline)
        tensors.update({f"head.{k}": v.contiguous() for k, v in head.state_tensors().items()})
        torch.save(tensors, folder / TORCH_FILE)
        return {"type": "torch-state-dict", "file": TORCH_FILE, "steps": steps, "classes": jsonable(list(head.classes_)),
                "learned": head.learned_extra()}
    import joblib

    joblib.dump(pipeline, folder / JOBLIB_FILE)
    return {"type": "joblib", "file": JOBLIB_FILE}


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


def read_head_meta(path: str | os.PathLike) -> dict:
    """The sidecar of the head folder ``path`` (checked: the folder exists and holds a featx head), without loading the head."""
    path = Path(path)
    if not path.is_dir():
        raise FeatxError(_not_a_head(path))
    return _read_sidecar(path)


def load_head(path: str | os.PathLike) -> LoadedHead:
    """Read a head folder written by ``featx fit-head``. joblib heads must come from a trusted source."""
    path = Path(path)
    meta = read_head_meta(path)
    ser = meta.get("serialization", {})
    file = path / ser.get("file", "")
    if not file.is_file():
        raise FeatxError(f"head folder '{path}' lacks its weights file '{ser.get('file')}'; refit the head")
    if ser.get("type") == "joblib":
        import joblib

        pipeline = joblib.load(file)
    elif ser.get("type") == "torch-state-dict":
        pipeline = _read_torch_head(file, meta, path)
    else:
        raise FeatxError(f"unknown serialization '{ser.get('type')}' in '{path / SIDECAR}'")
    return LoadedHead(path=path, pipeline=pipeline, meta=meta)


def _read_torch_head(file: Path, meta: dict, path: Path) -> Pipeline:
    import torch
    from sklearn.pipeline import Pipeline

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeatxError(f"cannot read '{file}': {load_failure(e)}; refit the head") from None
    ser, dim = meta["serialization"], int(meta["feature_dim"])
    steps = [(s["name"], _rebuild_step(s, state, dim)) for s in ser["steps"]]
    try:
        cls = torch_head_class(meta["estimator"])
    except KeyError:
        raise FeatxError(f"unknown torch head '{meta['estimator']}' in '{path / SIDECAR}'") from None
    head = cls(**meta["params"])
    head_state = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    head.load_state_tensors(head_state, np.asarray(ser["classes"]), ser.get("learned", {}))
    return Pipeline(steps + [("head", head)])
