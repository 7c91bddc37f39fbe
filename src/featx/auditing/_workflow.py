"""``featx audit``: what is wrong with the data, found from the cached embeddings of one group.

Four checks: near-duplicates within and across splits, likely label errors (cleanlab on out-of-fold
probabilities), outliers (distance to the k-th neighbour, of any class and of the same class) and
confusable class pairs; written as audit.json, audit.md and one static audit.html.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..configs import AuditConfig
from ..errors import FeatxError
from ..splits import choose_splits
from ..store import FeatureStore
from ._labels import LabelCheck, confusable_pairs, label_issues, label_rows, out_of_fold_probabilities
from ._page import open_thumbnail_source, write_outputs
from ._neighbours import PixelRule, Rows, near_duplicate_pairs, outlier_scores, reader, search
from ._verify import fallback_note, pixel_similarities

__all__ = ["AuditResult", "audit"]

_logger = logging.getLogger(__name__)

OUTLIER_FENCE_IQR = 3.0  # Tukey's "far out" fence: Q3 + 3 IQR of the any-class distances


@dataclass
class AuditResult:
    """Every finding of an audit, what it was computed from, and where it was written."""

    out: Path
    features: str
    key: str
    attrs: dict  # the group's attributes (model, weights hash, image list hash, recorded source)
    rows: Rows
    train_split: str
    test_split: str | None
    config: AuditConfig
    duplicates: list[dict]
    verified: dict  # the pixel stage: candidates compared, unreadable, confirmed; {} when the cosine alone decided
    saturated: int  # rows whose k-th neighbour is still a near-duplicate (more copies than listed)
    any_class: np.ndarray  # [n] cosine distance to the k-th nearest other image
    same_class: np.ndarray  # [n] the same within the image's class (NaN where undefined)
    fence: float  # outlier fence on any_class
    labels: LabelCheck
    notes: list[str] = field(default_factory=list)  # one line per input that limited a check
    seconds: dict = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)

    def outliers(self) -> list[dict]:
        """Rows beyond the fence, most isolated first."""
        flagged = np.flatnonzero(self.any_class > self.fence)
        return [self.row_record(i) for i in flagged[np.argsort(-self.any_class[flagged], kind="stable")]]

    def most_isolated(self, n: int) -> list[dict]:
        finite = np.flatnonzero(np.isfinite(self.any_class))
        return [self.row_record(i) for i in finite[np.argsort(-self.any_class[finite], kind="stable")][:n]]

    def row_record(self, i: int) -> dict:
        r = self.rows
        same = self.same_class[i]
        return {"id": str(r.ids[i]), "row": int(i), "split": str(r.splits[i]), "label": r.label_name(i),
                "any_class_distance": round(float(self.any_class[i]), 5),
                "same_class_distance": None if not np.isfinite(same) else round(float(same), 5)}

    def cross_counts(self) -> dict:
        """Near-duplicate pairs per pair of splits ('train|test': n), and test rows with a near-duplicate in training."""
        counts: dict[str, int] = {}
        for p in self.duplicates:
            key = "|".join(sorted((p["a_split"], p["b_split"])))
            counts[key] = counts.get(key, 0) + 1
        test_rows = set()
        if self.test_split is not None:
            for p in self.duplicates:
                if {p["a_split"], p["b_split"]} == {self.train_split, self.test_split}:
                    test_rows.add(p["a_row"] if p["a_split"] == self.test_split else p["b_row"])
        return {"pairs_by_splits": counts, "test_rows_with_training_duplicate": len(test_rows)}

    def to_dict(self) -> dict:
        from ._report import audit_dict

        return audit_dict(self)

    def summary(self) -> str:
        from ._report import summary_lines

        return "\n".join(summary_lines(self))


def audit(features: str | os.PathLike, config: AuditConfig, out: str | os.PathLike) -> AuditResult:
    """Audit group ``config.model`` of ``features``; write audit.json, audit.md and audit.html to ``out``."""
    from ..heads import showing_progress

    _check(config)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FeatxError(f"--out '{out}' is a file; pass a folder for the audit")
    with FeatureStore(features) as store, showing_progress(config.progress):
        src, note = open_thumbnail_source(config.source, store.attrs(config.model).get("source"), Path(features))
        if src is None and config.verify == "pixels":
            note = fallback_note(note, config.threshold)
        result = _run(store, features, config, out, src if config.verify == "pixels" else None)
    write_outputs(result, src, note)
    return result


def _check(config: AuditConfig) -> None:
    if not 0 < config.threshold <= 1:
        raise FeatxError(f"--threshold is a cosine similarity in (0, 1], got {config.threshold}")
    if config.k < 1 or config.top < 1:
        raise FeatxError(f"--k and --top must be at least 1, got {config.k} and {config.top}")
    if config.folds < 2:
        raise FeatxError(f"--folds must be at least 2, got {config.folds}")
    if config.verify not in ("pixels", "none"):
        raise FeatxError(f"--verify is pixels or none, got '{config.verify}'")
    if not 0 < config.candidate_threshold <= 1 or not -1 <= config.pixel_threshold <= 1:
        raise FeatxError(f"--candidate-threshold is a cosine in (0, 1] and --pixel-threshold a correlation in [-1, 1], got "
                         f"{config.candidate_threshold} and {config.pixel_threshold}")


def _run(store: FeatureStore, features, config: AuditConfig, out: Path, src) -> AuditResult:
    from ..fitting._plan import memory_budget

    key = store.resolve_key(config.model)
    rows = _rows(store, key)
    _check_out(out, features, key, store.attrs(key), config.overwrite)
    if len(rows) < 2:
        raise FeatxError(f"group '{key}' of '{features}' holds {len(rows)} row(s); an audit compares images, it needs two or more")
    train_split, test_split = choose_splits(store.split_names(key), train=config.train_split, test=config.test_split,
                                            labelled=store.labelled_splits(key), where=f"model '{key}' in '{features}'")
    budget, notes, seconds = memory_budget(config), [], {}
    read = reader(store, key, rows.blocks, budget)
    every = np.arange(len(rows))
    t0 = time.perf_counter()
    k = min(config.k, len(rows) - 1)
    if k < config.k:
        notes.append(f"only {len(rows)} images: each is compared with its {k} nearest (--k {config.k} asks for more)")
    neighbours = search(read, every, every, k, budget_bytes=budget, device=config.device)
    any_class, same_class, small = outlier_scores(read, rows, neighbours, k, budget_bytes=budget, device=config.device)
    seconds["neighbours"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pixels = None if src is None else PixelRule(config.candidate_threshold, config.pixel_threshold,
                                                lambda pairs: pixel_similarities(src, rows.ids, pairs))
    duplicates, saturated, verified = near_duplicate_pairs(neighbours, rows, config.threshold, pixels)
    seconds["pixels"] = time.perf_counter() - t0
    if verified["unreadable"]:
        notes.append(f"{verified['unreadable']} of {verified['candidates']} candidate pairs were not verified: an image is not in the "
                     "source or cannot be read (pass --source)")
    if small:
        notes.append(f"classes with {k} images or fewer have no same-class outlier distance (k={k}): {', '.join(small)}")
    if saturated:
        notes.append(f"{saturated} images have {k} near-duplicates or more; each lists its {k} most similar (raise --k to list more)")
    t0 = time.perf_counter()
    labels = _label_check(store, key, rows, train_split, config, budget)
    seconds["labels"] = time.perf_counter() - t0
    if (rows.labels < 0).all():
        notes.append("no labels: label checks and same-class outlier distances skipped; near-duplicates and any-class outliers only")
    elif labels.skipped:
        notes.append(f"label checks skipped: {labels.skipped}")
    elif labels.left_out:
        notes.append(f"classes with fewer than {config.folds} training images are left out of the label checks: {', '.join(labels.left_out)}")
    for note in notes:
        _logger.warning("%s", note)
    return AuditResult(out=out, features=str(Path(features).resolve()), key=key, attrs=store.attrs(key), rows=rows, train_split=train_split,
                       test_split=test_split, config=config, duplicates=duplicates, verified=verified if src is not None else {},
                       saturated=saturated, any_class=any_class, same_class=same_class, fence=_fence(any_class), labels=labels,
                       notes=notes, seconds=seconds)


def _rows(store: FeatureStore, key: str) -> Rows:
    from ..heads import tap_blocks

    every = store.row_numbers(key)
    return Rows(key=key, ids=store.ids_of(key, every), labels=store.labels_of(key, every), splits=store.splits_of(key, every),
                class_names=store.class_names(key), digests=store.digests_of(key, every), blocks=tap_blocks(store.attrs(key)))


def _check_out(out: Path, features, key: str, attrs: dict, overwrite: bool) -> None:
    """Refuse to replace an audit of other features in ``out`` unless ``overwrite``."""
    previous = out / "audit.json"
    if overwrite or not previous.is_file():
        return
    try:
        meta = json.loads(previous.read_text())
    except (OSError, json.JSONDecodeError):
        meta = {}
    same = (meta.get("features") == str(Path(features).resolve()) and meta.get("model_key") == key
            and meta.get("image_list_sha256") == attrs.get("image_list_sha256"))
    if not same:
        raise FeatxError(f"'{out}' holds an audit of other features ({meta.get('features')}, group {meta.get('model_key')}); "
                         "pass another --out or --overwrite")


def _fence(distances: np.ndarray) -> float:
    finite = distances[np.isfinite(distances)]
    if len(finite) < 4:
        return float("inf")
    q1, q3 = np.percentile(finite, [25, 75])
    return float(q3 + OUTLIER_FENCE_IQR * (q3 - q1))


@contextmanager
def _quiet_sweeps():
    """The folds' sweeps say nothing per fold (their chosen C is reported once, in the audit)."""
    logger = logging.getLogger("featx.heads._sweep")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _label_check(store: FeatureStore, key: str, rows: Rows, train_split: str, config: AuditConfig, budget: int) -> LabelCheck:
    """Out-of-fold probabilities on the training split, cleanlab's ranking, the out-of-fold confusion."""
    if (rows.labels < 0).all():
        return LabelCheck(skipped="the store has no labels")
    check, left_out, reason = label_rows(rows.labels, store.row_numbers(key, train_split), rows.class_names, config.folds)
    if reason:
        return LabelCheck(skipped=reason, left_out=left_out)
    try:
        import cleanlab  # noqa: F401
    except ModuleNotFoundError:
        return LabelCheck(skipped="cleanlab is not installed (pip install 'featx[audit]')", left_out=left_out)
    dim = store.feature_dim(key)
    if len(check) * dim * 4 > budget:
        return LabelCheck(skipped=f"{len(check)} training rows x {dim} features exceed the memory budget of {budget / 1e9:.1f} GB "
                                  "(--max-memory)", left_out=left_out)
    X = store.features_of(key, check)
    if not np.isfinite(X).all():
        raise FeatxError(f"feature rows of '{key}' hold NaN or infinite values; re-extract with --dtype float32 --precision fp32 --overwrite")
    classes = np.unique(rows.labels[check])
    y = np.searchsorted(classes, rows.labels[check])
    with _quiet_sweeps():
        probs, chosen = out_of_fold_probabilities(X, y, folds=config.folds, seed=config.seed, device=config.device)
    ranked, quality = label_issues(y, probs)
    predicted = probs.argmax(1)
    suspects = [{"id": str(rows.ids[check[i]]), "row": int(check[i]), "split": str(rows.splits[check[i]]),
                 "given": rows.class_names[classes[y[i]]], "suggested": rows.class_names[classes[predicted[i]]],
                 "label_quality": round(float(quality[i]), 5), "suggested_probability": round(float(probs[i, predicted[i]]), 5)}
                for i in ranked]
    return LabelCheck(rows=check, classes=classes, probabilities=probs, suspects=suspects,
                      confusable=confusable_pairs(y, predicted, rows.class_names, classes, top=0),
                      accuracy=float((predicted == y).mean()), chosen_C=chosen, left_out=left_out)
