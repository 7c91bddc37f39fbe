"""Intervals and paired tests against known values."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from featx.statistics import (bootstrap_interval, mcnemar_exact, mcnemar_exact_counts, metric_intervals,
                              paired_bootstrap_difference, wilson_interval, with_interval)


@pytest.mark.parametrize("k, n, expected", [
    (0, 10, (0.0, 0.2775)),        # the textbook zero-successes case: the normal approximation gives (0, 0)
    (10, 10, (0.7225, 1.0)),
    (145, 153, (0.9002, 0.9733)),  # the 153-image leaderboard of issue 19: 0.948 (0.900-0.973)
    (50, 100, (0.4038, 0.5962)),
])
def test_wilson_interval_matches_known_values(k, n, expected):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(expected[0], abs=1e-4) and hi == pytest.approx(expected[1], abs=1e-4)


def test_wilson_interval_agrees_with_scipy():
    from scipy.stats import binomtest

    for k, n in [(3, 7), (81, 263), (999, 1000), (1, 2)]:
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_mcnemar_exact_on_known_counts():
    assert mcnemar_exact_counts(0, 0) == 1.0                       # identical predictions: tied
    assert mcnemar_exact_counts(1, 5) == pytest.approx(14 / 64)     # 2 * P(X <= 1), X ~ Bin(6, 1/2)
    assert mcnemar_exact_counts(5, 1) == pytest.approx(14 / 64)     # symmetric
    assert mcnemar_exact_counts(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact_counts(3, 3) == pytest.approx(1.0)
    correct_a = np.array([1, 1, 0, 0, 1, 0, 0, 0, 0, 1], bool)
    correct_b = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 1], bool)      # 0 right for a only, 5 for b only
    assert mcnemar_exact(correct_a, correct_b) == pytest.approx(2 / 32)
    assert mcnemar_exact(correct_a, correct_a) == 1.0


def test_bootstrap_intervals_hold_the_point_estimate_and_shrink_with_more_images():
    rng = np.random.default_rng(0)
    widths = []
    for n in (200, 5000):
        y = rng.integers(0, 4, n)
        pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, 4, n))
        for metric, score in [("balanced_accuracy", balanced_accuracy_score(y, pred)),
                              ("macro_f1", f1_score(y, pred, average="macro"))]:
            lo, hi = bootstrap_interval(metric, y, pred)
            assert lo < score < hi
            widths.append(hi - lo)
    assert widths[2] < widths[0] / 3 and widths[3] < widths[1] / 3  # sqrt(25) = 5 times narrower, roughly


def test_metric_intervals_fields_and_text():
    y = np.array(["cat", "dog"] * 50)
    pred = y.copy()
    pred[:10] = "dog"
    out = metric_intervals(y, pred)
    assert set(out) == {"accuracy_ci", "balanced_accuracy_ci", "macro_f1_ci", "interval_description"}
    lo, hi = out["accuracy_ci"]
    assert lo < 0.95 < hi
    assert with_interval(0.948, (0.9, 0.9733)) == "0.948 (0.900–0.973)"


def test_paired_bootstrap_difference_sees_a_real_gain_and_not_a_tie():
    rng = np.random.default_rng(1)
    a = rng.random(2000) < 0.7
    b = a | (rng.random(2000) < 0.2)   # b is right wherever a is, and on ~6% more
    lo, hi = paired_bootstrap_difference(a, b)
    assert 0 < lo < b.mean() - a.mean() < hi
    lo, hi = paired_bootstrap_difference(a, a)
    assert lo == hi == 0


def test_perfect_predictions_have_a_point_interval_for_every_bootstrapped_metric():
    """A resample that misses a class averages over the classes it holds, as the score of a test set does."""
    y = np.repeat([0, 1, 2], 4)  # 12 images: about 2% of resamples miss a class
    assert bootstrap_interval("macro_f1", y, y) == (1.0, 1.0)
    assert bootstrap_interval("balanced_accuracy", y, y) == (1.0, 1.0)


def test_metrics_with_intervals_keeps_the_order_and_puts_each_interval_next_to_its_score():
    from featx.statistics import format_metrics, metrics_with_intervals

    y = np.arange(100) % 10
    pred = np.where(np.arange(100) < 90, y, (y + 1) % 10)
    metrics = {"accuracy": 0.9, "balanced_accuracy": 0.9, "macro_f1": 0.9, "top5_accuracy": 1.0}
    out = metrics_with_intervals(metrics, y, pred)
    assert list(out) == ["accuracy", "accuracy_ci", "balanced_accuracy", "balanced_accuracy_ci", "macro_f1", "macro_f1_ci",
                         "top5_accuracy", "top5_accuracy_ci"]
    assert out["accuracy_ci"] == pytest.approx(wilson_interval(90, 100)) and out["top5_accuracy_ci"] == pytest.approx(wilson_interval(100, 100))
    assert format_metrics(out).startswith(f"accuracy {with_interval(0.9, wilson_interval(90, 100))}  balanced_accuracy 0.900 (")
