"""``--max-minutes``: the budget of the whole run, the probe and the final scoring included.

No epoch starts that would end past the budget: before the first epoch its time is estimated from the rate at which
the run embedded its images for the probe, after it from what the epochs took. The learning-rate schedule is fitted
to the epochs that fit (before the first epoch, then again after it, with a measured epoch).
"""

from __future__ import annotations

import math

__all__ = ["TRAIN_COST", "epoch_estimate", "epochs_that_fit"]

# A training image costs about this many inference forwards (forward, backward and update; 2.5-4.5 measured for
# EfficientNet-Lite0 on the CPU): only the first epoch's estimate uses it, every later one is measured.
TRAIN_COST = 3.0


def epoch_estimate(n_train: int, n_scored: int, images_per_s: float) -> float:
    """Seconds of an epoch that trains ``n_train`` images and scores ``n_scored`` (validation passes, --test-curve)."""
    return (TRAIN_COST * n_train + n_scored) / max(images_per_s, 1e-9)


def epochs_that_fit(budget_s: float, elapsed_s: float, epoch_s: float, final_s: float, done: int) -> int:
    """Epochs (``done`` included) that end, final scoring included, within ``budget_s`` seconds."""
    room = budget_s - elapsed_s - final_s
    return done + max(0, math.floor(room / max(epoch_s, 1e-9)))
