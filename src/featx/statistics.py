"""How much a test score knows: intervals, paired comparisons and the exact McNemar test.

Every accuracy featx prints carries a 95% interval: Wilson's score interval for accuracy (a
binomial proportion), a percentile bootstrap over the test images for balanced accuracy and
macro F1. Two models scored on the same images are compared pairwise: the exact McNemar test
on their discordant images (are they distinguishable?) and a paired bootstrap of the difference
(by how much?). numpy and scipy only, so every workflow and the command line can use it.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

__all__ = ["CONFIDENCE", "TIE_P", "wilson_interval", "bootstrap_interval", "metric_intervals", "metrics_with_intervals",
           "paired_bootstrap_difference", "mcnemar_exact", "mcnemar_exact_counts", "format_interval", "with_interval",
           "format_metrics", "half_width", "interval_description"]

CONFIDENCE = 0.95
N_BOOTSTRAP = 1000
TIE_P = 0.05  # two models whose exact McNemar p-value is at least this are not distinguishable on their test images


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval for a proportion of ``successes`` out of ``n`` (Wilson 1927).

    It stays inside [0, 1] and keeps its coverage near 0 and 1, where the normal approximation
    (p +- z sqrt(p(1-p)/n)) collapses to a point.
    """
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _resamples(n: int, n_boot: int, seed: int, chunk: int = 200):
    """Blocks of bootstrap index rows [b, n], seeded, drawn a block at a time to bound memory."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        yield rng.integers(0, n, size=(min(chunk, n_boot - start), n))


def _per_class_counts(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray, n_classes: int):
    """(true positives, true count, predicted count), each [b, n_classes], of every resample row of ``idx``."""
    b = idx.shape[0]
    offset = (np.arange(b) * n_classes)[:, None]
    t, p = y_true[idx], y_pred[idx]
    size = b * n_classes
    tp = np.bincount((offset + t)[t == p], minlength=size).reshape(b, n_classes)
    true = np.bincount((offset + t).ravel(), minlength=size).reshape(b, n_classes)
    pred = np.bincount((offset + p).ravel(), minlength=size).reshape(b, n_classes)
    return tp, true, pred


def _balanced_accuracy(tp, true, pred, labels):
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp[:, labels] / true[:, labels]
    return np.nanmean(recall, axis=1)


def _macro_f1(tp, true, pred, labels):
    """Mean F1 over the classes of ``labels`` that the resample's true labels hold, as :func:`featx.metrics` averages
    over the classes of ``y_true`` (a class a resample lacks has no F1 to average, rather than an F1 of 0)."""
    present = true[:, labels] > 0
    denom = (true + pred)[:, labels]
    f1 = np.where(present, 2 * tp[:, labels] / np.maximum(denom, 1), 0.0)
    return f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


_BOOTSTRAPPED = {"balanced_accuracy": _balanced_accuracy, "macro_f1": _macro_f1}


def bootstrap_interval(metric: str, y_true, y_pred, *, confidence: float = CONFIDENCE, n_boot: int = N_BOOTSTRAP,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric`` ('balanced_accuracy' or 'macro_f1') over the test images.

    Each resample is scored as featx's metrics score a test set: averaged over the classes its true labels hold (a
    resample that misses a class averages over the classes it has).
    """
    y_true, y_pred = _encoded(y_true, y_pred)
    n = len(y_true)
    if n == 0:
        return (float("nan"), float("nan"))
    n_classes = int(max(y_true.max(), y_pred.max())) + 1
    labels = np.unique(y_true)
    values = np.concatenate([_BOOTSTRAPPED[metric](*_per_class_counts(y_true, y_pred, idx, n_classes), labels)
                             for idx in _resamples(n, n_boot, seed)])
    alpha = (1 - confidence) / 2
    lo, hi = np.nanquantile(values, [alpha, 1 - alpha])
    return (float(lo), float(hi))


def _encoded(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    """Both label arrays as codes 0..K-1 over their joint values (labels may be strings)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    values, codes = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    return codes[: len(y_true)].astype(np.int64), codes[len(y_true):].astype(np.int64)


def metric_intervals(y_true, y_pred, *, confidence: float = CONFIDENCE, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> dict:
    """``accuracy_ci``, ``balanced_accuracy_ci`` and ``macro_f1_ci`` ([low, high] each), plus how they were made.

    Accuracy: Wilson's interval; balanced accuracy and macro F1: a percentile bootstrap over the
    test images (``n_boot`` resamples, seeded).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n = len(y_true)
    correct = int(np.sum(y_true == y_pred))
    out = {"accuracy_ci": list(wilson_interval(correct, n, confidence))}
    for metric in _BOOTSTRAPPED:
        out[f"{metric}_ci"] = list(bootstrap_interval(metric, y_true, y_pred, confidence=confidence, n_boot=n_boot, seed=seed))
    out["interval_description"] = interval_description(n, confidence=confidence, n_boot=n_boot)
    return out


def interval_description(n: int, *, confidence: float = CONFIDENCE, n_boot: int = N_BOOTSTRAP) -> str:
    """How :func:`metric_intervals` made its intervals, in words."""
    return (f"{confidence:.0%} intervals over the {n} test images: Wilson for accuracy, a percentile "
            f"bootstrap ({n_boot} resamples) for balanced accuracy and macro F1")


def metrics_with_intervals(metrics: dict, y_true, y_pred, *, confidence: float = CONFIDENCE, n_boot: int = N_BOOTSTRAP,
                           seed: int = 0) -> dict:
    """``metrics`` (featx's schema) with each score's interval right after it: ``accuracy``, ``accuracy_ci``, ...

    ``top5_accuracy`` gets Wilson's interval too (a proportion of the same ``len(y_true)`` images).
    """
    n = len(y_true)
    intervals = metric_intervals(y_true, y_pred, confidence=confidence, n_boot=n_boot, seed=seed)
    if "top5_accuracy" in metrics:
        intervals["top5_accuracy_ci"] = list(wilson_interval(round(metrics["top5_accuracy"] * n), n, confidence))
    out = {}
    for name, value in metrics.items():
        out[name] = value
        if f"{name}_ci" in intervals:
            out[f"{name}_ci"] = intervals[f"{name}_ci"]
    return out


def paired_bootstrap_difference(correct_a, correct_b, *, confidence: float = CONFIDENCE, n_boot: int = N_BOOTSTRAP,
                                seed: int = 0) -> tuple[float, float]:
    """Interval of accuracy(b) - accuracy(a) on the same images, by resampling the images (pairs kept together)."""
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("both models must be scored on the same images")
    n = len(a)
    if n == 0:
        return (float("nan"), float("nan"))
    diff = b - a
    values = np.concatenate([diff[idx].mean(axis=1) for idx in _resamples(n, n_boot, seed)])
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return (float(lo), float(hi))


def mcnemar_exact(correct_a, correct_b) -> float:
    """Two-sided exact McNemar p-value: are two models scored on the same images distinguishable?

    Only the discordant images count: b = right for a only, c = right for b only. Under the null
    hypothesis each discordant image is a fair coin, so p = P(Binomial(b + c, 1/2) as extreme as
    observed). Identical predictions (b + c = 0) give p = 1.
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError("both models must be scored on the same images")
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    return mcnemar_exact_counts(only_a, only_b)


def mcnemar_exact_counts(only_a: int, only_b: int) -> float:
    """:func:`mcnemar_exact` from the two discordant counts."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(min(only_a, only_b), n, 0.5, alternative="two-sided").pvalue)


def format_interval(interval) -> str:
    """``(0.900–0.973)``: an interval as featx prints it."""
    lo, hi = interval
    return f"({lo:.3f}–{hi:.3f})"


def with_interval(value: float, interval) -> str:
    """``0.948 (0.900–0.973)``: a score and its interval, as text and markdown show them."""
    return f"{value:.3f} {format_interval(interval)}"


def format_metrics(metrics: dict) -> str:
    """``accuracy 0.948 (0.900–0.973)  balanced_accuracy ...``: every score of ``metrics``, with its interval when it has one."""
    return "  ".join(f"{k} {with_interval(v, metrics[f'{k}_ci']) if metrics.get(f'{k}_ci') else f'{v:.4f}'}"
                     for k, v in metrics.items() if not k.endswith("_ci") and isinstance(v, (int, float)))


def half_width(interval) -> float:
    """Half the width of an interval: the ``0.03`` of ``0.97 ± 0.03`` (Wilson's interval is not symmetric about the score)."""
    lo, hi = interval
    return (hi - lo) / 2
