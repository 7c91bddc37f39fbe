"""``featx evaluate``: a saved head's metrics, per-class report and confusion matrix on a split of a store."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FeatxError
from .files import check_writable, safe_name, write_json_atomic
from .head_folder import LoadedHead, load_head
from .metrics import classification_metrics, confusion, per_class_report
from .plots import save_confusion_png
from .provenance import provenance
from .run_folder import is_run_folder, not_a_head_message
from .statistics import format_metrics, interval_description, metrics_with_intervals, with_interval
from .splits import stratified_holdout
from .store import FeatureSet, FeatureStore

__all__ = ["EvaluationResult", "evaluate_head"]


@dataclass
class EvaluationResult:
    """Metrics of a head on one split, and where they were written."""

    head: str
    model: str
    split: str  # split name
    holdout: bool  # True: the rows are the seeded hold-out of ``split`` the head was tested on
    n: int
    metrics: dict
    per_class: list[dict]
    confusion: list[list[int]]
    class_names: list[str]
    json_path: Path
    png_path: Path

    @property
    def split_description(self) -> str:
        return f"hold-out of '{self.split}'" if self.holdout else f"split '{self.split}'"

    def to_dict(self) -> dict:
        return {"head": self.head, "model": self.model, "split": self.split, "holdout": self.holdout,
                "split_description": self.split_description, "n": self.n, **self.metrics, "intervals": interval_description(self.n),
                "json": str(self.json_path), "png": str(self.png_path)}

    def summary(self) -> str:
        width = max(12, *(len(c["class"]) for c in self.per_class))
        lines = [f"Head '{self.head}' on {self.n} rows of '{self.model}' ({self.split_description}):",
                 "  " + format_metrics(self.metrics) + f"  [{interval_description(self.n)}]",
                 f"  {'class':<{width}} precision  recall     f1  support"]
        lines += [f"  {c['class']:<{width}} {c['precision']:9.4f} {c['recall']:7.4f} {c['f1']:6.4f} {c['support']:8d}"
                  for c in self.per_class]
        lines.append(f"Wrote {self.json_path} and {self.png_path}.")
        return "\n".join(lines)


def evaluate_head(head_dir: str | os.PathLike, features: str | os.PathLike, *, split: str | None = None,
                  model: str | None = None, out_dir: str | os.PathLike | None = None, overwrite: bool = False) -> EvaluationResult:
    """Metrics, per-class report and confusion matrix of a saved head on a split of ``features``.

    Without ``split``: the head's test split, or the same seeded hold-out it was tested on.
    Outputs are named by split (and by store and group when they are not the head's own), and an
    output written from another store is never replaced without ``overwrite``. A fine-tuning run folder
    is refused with the commands that score it (``predict`` on images, or ``extract --weights`` then ``fit-head``).
    """
    if is_run_folder(head_dir):
        raise FeatxError(not_a_head_message(head_dir))
    head = load_head(head_dir)
    check_writable(head_dir if out_dir is None else out_dir, option="--out-dir" if out_dir is not None else "HEAD_DIR", folder=True)
    fs, key, split, holdout = _evaluation_rows(head, features, split, model)
    names = head.class_names
    if fs.class_names != names:
        raise FeatxError(f"the class names of '{key}' in '{features}' differ from the head's ({', '.join(fs.class_names[:5])} ... vs "
                         f"{', '.join(names[:5])} ...); evaluate on features of the same labelled image set")
    scores = head.scores(fs.X)
    y_pred = np.asarray(head.pipeline.predict(fs.X))
    metrics = classification_metrics(fs.y, y_pred, scores, n_classes=len(names))
    metrics = metrics_with_intervals(metrics, fs.y, y_pred)
    report = per_class_report(fs.y, y_pred, names)
    cm = confusion(fs.y, y_pred, len(names))
    json_path, png_path = _output_paths(head, features, key, split, holdout, out_dir, overwrite)
    result = EvaluationResult(head=head.meta["head"], model=key, split=split, holdout=holdout, n=len(fs), metrics=metrics,
                              per_class=report, confusion=cm.tolist(), class_names=names, json_path=json_path, png_path=png_path)
    write_json_atomic(json_path, {**result.to_dict(), "features": str(Path(features).resolve()),
                                  "head_dir": str(Path(head_dir).resolve()), "per_class": report,
                                  "confusion_matrix": cm.tolist(), "class_names": names, **provenance()})
    title = f"{head.meta['head']} on {key} ({result.split_description}): accuracy {with_interval(metrics['accuracy'], metrics['accuracy_ci'])}"
    save_confusion_png(cm, names, title, png_path)
    return result


def _evaluation_rows(head: LoadedHead, features, split: str | None, model: str | None) -> tuple[FeatureSet, str, str, bool]:
    """(rows, group key, split name, whether they are the head's hold-out), checked against the head."""
    meta = head.meta
    with FeatureStore(features) as store:
        key = store.resolve_key(model or meta["model_key"])
        attrs = store.attrs(key)
        head.check_features(attrs, key, int(attrs.get("num_features", meta["feature_dim"])), f"'{features}'")
        holdout = split is None and not meta.get("test_split")
        if split is None:
            split = meta.get("test_split") or _holdout_split(meta, attrs, store, key, features)
        fs = store.read(key, split)
    if holdout:
        labelled = np.flatnonzero(fs.y >= 0)
        fs = fs.subset(labelled[stratified_holdout(fs.y[labelled], meta["holdout"]["fraction"], meta["holdout"]["seed"])[1]])
    fs = fs.require_finite(split).labelled("evaluation", split)
    head.check_features(attrs, key, fs.X.shape[1], f"'{features}'")
    return fs, key, split, holdout


def _holdout_split(meta: dict, attrs: dict, store: FeatureStore, key: str, features) -> str:
    if meta.get("holdout") and attrs.get("image_list_sha256") == meta["backbone"].get("image_list_sha256"):
        return meta["holdout"]["split"]
    raise FeatxError(f"the head was tested on a hold-out of another image list; choose a split of '{features}' with --split "
                     f"({', '.join(store.split_names(key))})")


def _output_paths(head: LoadedHead, features, key: str, split: str, holdout: bool, out_dir, overwrite: bool) -> tuple[Path, Path]:
    """evaluation-<tag>.json and confusion-<tag>.png; the tag names the store and group when they are not the head's."""
    resolved = str(Path(features).resolve())
    tag = f"{split}-holdout" if holdout else split
    if resolved != head.meta.get("features") or key != head.meta.get("model_key"):
        tag = f"{Path(features).stem}-{key}-{tag}"
    tag = safe_name(tag)
    folder = Path(out_dir) if out_dir else head.path
    folder.mkdir(parents=True, exist_ok=True)
    json_path, png_path = folder / f"evaluation-{tag}.json", folder / f"confusion-{tag}.png"
    if json_path.exists() and not overwrite:
        try:
            earlier = json.loads(json_path.read_text()).get("features")
        except (OSError, json.JSONDecodeError):
            earlier = None
        if earlier != resolved:
            raise FeatxError(f"'{json_path}' holds an evaluation of other features ({earlier}); pass --out-dir DIR "
                             "to write elsewhere, or --overwrite to replace it")
    return json_path, png_path
