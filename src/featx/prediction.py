"""``featx predict``: the head's own backbone (same weights, verified by hash; same preprocessing) and the head on new images,
or a fine-tuning run's model (backbone and classifier, with the run's eval preprocessing)."""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .configs import PredictConfig
from .embedder import ImageEmbedder, head_embedder, run_embedder
from .errors import FeatxError
from .files import atomic_path, check_writable
from .head_folder import load_head
from .metrics import softmax
from .run_folder import is_run_folder, load_run
from .sources import ImageSource, resolve_source
from .statistics import format_interval, wilson_interval

__all__ = ["PredictResult", "predict_images"]

_logger = logging.getLogger(__name__)


@dataclass
class PredictResult:
    """What ``predict_images`` wrote."""

    out: Path
    n_images: int
    n_predicted: int
    unreadable: list[tuple[str, str]]  # (path, reason)
    seconds: float
    accuracy: float | None = None  # over the images whose label is one of the head's classes
    accuracy_ci: list[float] | None = None  # its 95% Wilson interval
    accuracy_by_split: dict = field(default_factory=dict)  # split -> {'accuracy', 'accuracy_ci', 'n'} when the source has several splits
    unknown_classes: list[str] = field(default_factory=list)  # labels of the source the head does not know

    def to_dict(self) -> dict:
        return {**asdict(self), "out": str(self.out)}

    def summary(self) -> str:
        text = f"Predicted {self.n_predicted} of {self.n_images} images in {self.seconds:.1f} s into {self.out}"
        if self.accuracy is not None:
            by_split = ", ".join(f"{s} {v['accuracy']:.4f} {format_interval(v['accuracy_ci'])} ({v['n']} images)"
                                 for s, v in self.accuracy_by_split.items())
            text += (f" (accuracy on the source's labels: {self.accuracy:.4f} {format_interval(self.accuracy_ci)}"
                     + (f"; by split: {by_split}" if by_split else "") + "; 95% Wilson intervals)")
        if self.unknown_classes:
            text += f"; classes the head does not know, left out of the accuracy: {', '.join(self.unknown_classes)}"
        if self.unreadable:
            text += f"; {len(self.unreadable)} unreadable, listed with an empty label and the reason in the 'error' column"
        return text + "."


def predict_images(head_dir: str | os.PathLike, source, out: str | os.PathLike, config: PredictConfig | None = None) -> PredictResult:
    """Embed the images of ``source`` with the head's backbone and write one CSV row per image to ``out``:
    ``path,label,probability,error``, then ``label_2,probability_2 ... label_K,probability_K`` (top-k),
    ``true_label`` when the source has labels and ``split`` when it has several splits.

    ``head_dir`` is a head folder (``featx fit-head``) or a fine-tuning run folder (``featx finetune``), whose
    model, classifier included, scores the images with the run's eval preprocessing.
    Unreadable images get a row with an empty label and the reason in ``error``; they never stop the run.
    ``config.weights`` points at the checkpoint when it has moved (its hash must still match the head's), or
    picks a run's checkpoint (default: its best.pt, else last.pt).
    """
    config = config or PredictConfig()
    t0 = time.perf_counter()
    out = Path(out)
    check_writable(out, option="--out")
    if config.top_k is not None and config.top_k < 1:
        raise FeatxError(f"--top-k must be at least 1, got {config.top_k}")
    classifier = _run_classifier(head_dir, config) if is_run_folder(head_dir) else _head_classifier(head_dir, config)
    src = source if isinstance(source, ImageSource) else resolve_source(source)
    feats, reasons = _embed(classifier.embedder, src, classifier.dim, config.progress)
    if classifier.float16:
        feats = feats.astype(np.float16).astype(np.float32)  # as the head saw its training features
    names = classifier.class_names
    k = min(len(names), config.top_k or (5 if len(names) > 5 else 1))
    ranked, probs = _classify(classifier.scores, feats, reasons, k)
    truth, unknown = _true_labels(src, names)
    splits = src.splits if len(src.split_names) > 1 else None
    paths = [str(src.path(i)) if src.path(i) is not None else src.ids[i] for i in range(len(src))]
    true_names = None if truth is None else [src.class_names[y] if y >= 0 else "" for y in src.labels]
    _write_csv(out, paths, names, ranked, probs, reasons, true_names, splits)
    unreadable = [(paths[i], reasons[i]) for i in sorted(reasons)]
    if unreadable:
        _logger.warning("%d images could not be read (empty label in the CSV): %s%s", len(unreadable),
                        "; ".join(f"{p}: {r}" for p, r in unreadable[:10]), "; ..." if len(unreadable) > 10 else "")
    accuracy, by_split = _accuracy(truth, ranked[:, 0], splits)
    return PredictResult(out=out, n_images=len(src), n_predicted=int((ranked[:, 0] >= 0).sum()), unreadable=unreadable,
                         seconds=time.perf_counter() - t0, accuracy=accuracy.get("accuracy"), accuracy_ci=accuracy.get("accuracy_ci"),
                         accuracy_by_split=by_split, unknown_classes=unknown)


@dataclass
class _Classifier:
    """What labels images: an embedder, and the function from its outputs [n, dim] to class probabilities [n, K]."""

    embedder: ImageEmbedder
    class_names: list[str]
    dim: int
    scores: Callable[[np.ndarray], np.ndarray]
    float16: bool = False  # round the outputs through float16 first (the head was fitted on float16 features)


def _head_classifier(head_dir, config: PredictConfig) -> _Classifier:
    head = load_head(head_dir)
    embedder = head_embedder(head, device=config.device, batch_size=config.batch_size, workers=config.workers, weights=config.weights,
                             runtime=config.runtime)
    return _Classifier(embedder, head.class_names, int(head.meta["feature_dim"]), head.scores,
                       float16=head.meta["backbone"].get("dtype") == "float16")


def _run_classifier(run_dir, config: PredictConfig) -> _Classifier:
    run = load_run(run_dir, config.weights)
    embedder = run_embedder(run, device=config.device, batch_size=config.batch_size, workers=config.workers, runtime=config.runtime)
    return _Classifier(embedder, run.class_names, len(run.class_names), lambda logits: softmax(logits.astype(np.float64)))


def _true_labels(src: ImageSource, names: list[str]) -> tuple[np.ndarray | None, list[str]]:
    """The source's labels as the head's class indices (-1: unlabeled or a class the head does not know); None without labels."""
    if not (src.labels >= 0).any():
        return None, []
    index = {c: k for k, c in enumerate(names)}
    mapping = np.array([index.get(c, -1) for c in src.class_names] + [-1], dtype=np.int64)
    present = {src.class_names[c] for c in np.unique(src.labels[src.labels >= 0])}
    unknown = sorted(c for c in present if c not in index)
    if unknown:
        _logger.warning("the source has %d classes the head does not know (%s); their images are left out of the accuracy",
                        len(unknown), ", ".join(unknown[:5]))
    return mapping[src.labels], unknown


def _accuracy(truth, predicted, splits) -> tuple[dict, dict]:
    """{'accuracy', 'accuracy_ci'} over images with a known true class and a prediction, overall and per split (with 'n')."""
    if truth is None:
        return {}, {}
    scored = (truth >= 0) & (predicted >= 0)
    if not scored.any():
        return {}, {}
    hits = truth == predicted
    by_split = {}
    if splits is not None:
        split_arr = np.asarray(splits)
        for name in dict.fromkeys(splits):
            m = scored & (split_arr == name)
            if m.any():
                by_split[name] = {**_with_ci(hits[m]), "n": int(m.sum())}
    return _with_ci(hits[scored]), by_split


def _with_ci(hits: np.ndarray) -> dict:
    return {"accuracy": float(hits.mean()), "accuracy_ci": list(wilson_interval(int(hits.sum()), len(hits)))}


def _embed(embedder: ImageEmbedder, src: ImageSource, dim: int, progress: bool) -> tuple[np.ndarray, dict[int, str]]:
    """(features [n, dim] with NaN rows for unreadable images, {image index: reason})."""
    n = len(src)
    feats = np.full((n, dim), np.nan, np.float32)
    reasons: dict[int, str] = {}
    with tqdm(total=n, unit="img", desc="predict", disable=not progress) as bar:
        for batch in embedder.iter_batches(src):
            if batch.index:
                if batch.features.shape[1] != dim:
                    raise FeatxError(f"the backbone gives {batch.features.shape[1]}-dimensional features, the head expects {dim}")
                feats[batch.index] = batch.features
            reasons.update(dict(batch.bad))
            bar.update(len(batch.index) + len(batch.bad))
    return feats, reasons


def _classify(scores: Callable[[np.ndarray], np.ndarray], feats: np.ndarray, reasons: dict[int, str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(top-k class indices [n, k], their probabilities [n, k]); -1 and NaN for images without a usable embedding."""
    n = len(feats)
    finite = np.isfinite(feats).all(axis=1)
    for i in np.flatnonzero(~finite):
        reasons.setdefault(int(i), "embedding is NaN or infinite")
    ok_idx = np.flatnonzero(finite)
    ranked, probs = np.full((n, k), -1, dtype=np.int64), np.full((n, k), np.nan)
    if len(ok_idx):
        s = scores(feats[ok_idx])
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        ranked[ok_idx] = top
        probs[ok_idx] = np.take_along_axis(s, top, axis=1)
    return ranked, probs


def _write_csv(out: Path, paths, names, ranked, probs, reasons, true_names, splits) -> None:
    k = ranked.shape[1]
    header = ["path", "label", "probability", "error"] + [f"{c}_{r}" for r in range(2, k + 1) for c in ("label", "probability")]
    header += (["true_label"] if true_names is not None else []) + (["split"] if splits is not None else [])
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i in range(len(paths)):
            ok = ranked[i, 0] >= 0
            top = [(names[ranked[i, r]], f"{probs[i, r]:.6f}") if ok else ("", "") for r in range(k)]
            row = [paths[i], *top[0], reasons.get(i, "")] + [v for pair in top[1:] for v in pair]
            if true_names is not None:
                row.append(true_names[i])
            if splits is not None:
                row.append(splits[i])
            w.writerow(row)
