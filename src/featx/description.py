"""``featx info``: what a feature store, a head folder or a fine-tuning run folder holds, in a few lines or as JSON.

Only attributes and sidecars are read (the store's group attributes and split codes, ``head.json``, ``run.json``
and ``metrics.json``), never features or weights, and nothing imports torch, timm or scikit-learn.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FeatxError
from .head_folder import SIDECAR, read_head_meta
from .run_folder import RUN_FILE, read_run_meta
from .statistics import wilson_interval, with_interval
from .store import FeatureStore

__all__ = ["Description", "describe"]


@dataclass
class Description:
    """What ``featx info`` says about one path."""

    path: Path
    kind: str  # 'store', 'head' or 'run'
    entries: list[dict] = field(default_factory=list)  # one per group of a store; one for a head or a run

    def to_dict(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "entries": self.entries}

    def summary(self) -> str:
        if self.kind == "store":
            lines = [f"{self.path}: feature store, {len(self.entries)} group{'s' if len(self.entries) != 1 else ''}"]
            lines += [line for e in self.entries for line in _store_lines(e)]
        elif self.kind == "head":
            lines = [f"{self.path}: head folder", *_head_lines(self.entries[0])]
        else:
            lines = [f"{self.path}: fine-tuning run folder", *_run_lines(self.entries[0])]
        return "\n".join(lines)


def describe(path: str | os.PathLike) -> Description:
    """Describe ``path``: a feature store (FEATURES.h5), a head folder (fit-head) or a fine-tuning run folder (finetune)."""
    path = Path(path)
    if path.is_dir():
        if (path / RUN_FILE).is_file():
            return Description(path, "run", [_run_entry(path)])
        if (path / SIDECAR).is_file():
            return Description(path, "head", [_head_entry(path)])
        raise FeatxError(f"'{path}' is a folder but neither a head folder ({SIDECAR}) nor a fine-tuning run folder ({RUN_FILE}); "
                         "featx info describes a feature store, a head folder or a run folder")
    if not path.exists():
        raise FeatxError(f"'{path}' does not exist; featx info describes a feature store (FEATURES.h5), a head folder or a run folder")
    with FeatureStore(path) as store:
        return Description(path, "store", [_group_entry(store, key) for key in store.models()])


def _taps(taps_json: str | None, layers: str | None) -> list[str]:
    taps = json.loads(taps_json) if taps_json else []
    return [t["tap"] for t in taps] if taps else [t for t in (layers or "last").split(",") if t]


def _group_entry(store: FeatureStore, key: str) -> dict:
    a = store.attrs(key)
    per_split = store.split_counts(key)
    return {"group": key, "model": a.get("model"), "rows": sum(per_split.values()), "rows_per_split": per_split,
            "dim": store.feature_dim(key), "taps": _taps(a.get("taps"), a.get("layers")), "flip": a.get("tta") == "flip",
            "weights": a.get("weights"), "weights_sha256": a.get("weights_sha256"), "skipped": int(a.get("n_skipped", 0)),
            "img_size": a.get("img_size"), "precision": a.get("precision"), "dtype": a.get("dtype"), "source": a.get("source"),
            "created": a.get("created")}


def _accuracy(metrics: dict, n: int) -> dict:
    acc = metrics.get("accuracy")
    if acc is None:
        return {}
    interval = metrics.get("accuracy_ci") or list(wilson_interval(round(acc * n), n))
    return {"accuracy": acc, "accuracy_ci": interval}


def _head_entry(path: Path) -> dict:
    m = read_head_meta(path)
    bb = m.get("backbone") or {}
    sweep = m.get("sweep") or {}
    return {"head": m.get("head"), "estimator": m.get("estimator"), "chosen": sweep.get("best"), "group": m.get("model_key"),
            "features": m.get("features"), "model": bb.get("model"), "dim": m.get("feature_dim"),
            "taps": _taps(bb.get("taps"), bb.get("layers")), "flip": bb.get("tta") == "flip", "weights": bb.get("weights"),
            "weights_sha256": bb.get("weights_sha256"), "classes": len(m.get("class_names") or []), "n_train": m.get("n_train"),
            "n_test": m.get("n_test"), "test_split": m.get("test_split") or f"hold-out of '{m.get('train_split')}'",
            **_accuracy(m.get("metrics") or {}, int(m.get("n_test") or 0)), "created": m.get("created")}


def _run_entry(path: Path) -> dict:
    run = read_run_meta(path)
    config = run["config"]
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        metrics = {}  # an unfinished run
    checkpoints = [name for name in ("best.pt", "last.pt") if (path / name).is_file()]
    return {"model": config.get("model"), "weights": config.get("weights") or ("timm-pretrained" if config.get("pretrained") else "random"),
            "weights_sha256": run.get("weights_sha256"), "img_size": config.get("img_size") or (run.get("data_config") or {}).get("input_size"),
            "classes": len(run.get("class_names") or []), "images": run.get("images"), "finished": bool(metrics),
            "epochs_done": metrics.get("epochs_done"), "best_epoch": metrics.get("best_epoch"), "n_train": metrics.get("n_train"),
            "n_test": metrics.get("n_test"), **_accuracy(metrics, int(metrics.get("n_test") or 0)),
            "checkpoints": checkpoints, "created": run.get("created")}


def _short(sha: str | None) -> str:
    return f"{sha[:12]}..." if sha else "?"


def _store_lines(e: dict) -> list[str]:
    splits = ", ".join(f"{s} {n}" for s, n in e["rows_per_split"].items()) or "none"
    return [f"  {e['group']}: model {e['model']}, {e['rows']} rows ({splits}), dim {e['dim']}, {e['skipped']} skipped",
            f"    taps {','.join(e['taps'])}, flip {'yes' if e['flip'] else 'no'}, {e['img_size']} px, {e['precision']} -> {e['dtype']}; "
            f"weights {_short(e['weights_sha256'])} ({e['weights']}); created {e['created']}"]


def _head_lines(e: dict) -> list[str]:
    chosen = ", ".join(f"{k}={v}" for k, v in (e["chosen"] or {}).items())
    score = (f"; test accuracy {with_interval(e['accuracy'], e['accuracy_ci'])} on {e['n_test']} rows ({e['test_split']})"
             if "accuracy" in e else "")
    return [f"  head {e['head']} ({e['estimator']}{', ' + chosen if chosen else ''}) on group '{e['group']}' of {e['features']}",
            f"  model {e['model']}, dim {e['dim']}, taps {','.join(e['taps'])}, flip {'yes' if e['flip'] else 'no'}, "
            f"weights {_short(e['weights_sha256'])} ({e['weights']})",
            f"  {e['classes']} classes, trained on {e['n_train']} rows{score}; created {e['created']}"]


def _run_lines(e: dict) -> list[str]:
    if e["finished"]:
        state = (f"finished: {e['epochs_done']} epochs, chose epoch {e['best_epoch']}; test accuracy "
                 f"{with_interval(e['accuracy'], e['accuracy_ci'])} on {e['n_test']} images")
    else:
        state = f"not finished (checkpoints: {', '.join(e['checkpoints']) or 'none'})"
    return [f"  model {e['model']}, {e['img_size']} px, weights {_short(e['weights_sha256'])} ({e['weights']}), {e['classes']} classes",
            f"  {state}; created {e['created']}"]
