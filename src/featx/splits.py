"""Which rows train and which test: split names, the one rule for choosing them, the one stratified hold-out.

``featx fit-head``, ``evaluate``, ``finetune``, the sweeps and early stopping all hold rows out
with :func:`stratified_holdout` and choose their splits with :func:`choose_splits`, so a head
and a fine-tuning run on the same images are scored on the same test rows; ``featx audit``'s
out-of-fold probabilities come from :func:`stratified_folds`.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import FeatxError

__all__ = ["SPLIT_FOLDER_NAMES", "TRAIN_SPLIT_NAMES", "TEST_SPLIT_NAMES", "stratified_holdout", "stratified_folds", "holdout_per_class",
           "pick_split", "choose_splits"]

TRAIN_SPLIT_NAMES = ("train", "training")
# Preferred test splits, best first ("val" when there is no "test").
TEST_SPLIT_NAMES = ("test", "testing", "val", "valid", "validation", "dev", "holdout")
# Folder names that mark a split-first layout (SOURCE/<split>/<class>/<image>).
SPLIT_FOLDER_NAMES = TRAIN_SPLIT_NAMES + TEST_SPLIT_NAMES


def stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, held-out rows), both sorted: a seeded hold-out of ``ceil(fraction * n)`` rows.

    Stratified by class whenever every class has two rows or more (then at least one row of
    every class is held out and one kept); a plain seeded split otherwise.
    """
    from sklearn.model_selection import train_test_split

    y = np.asarray(y)
    n = len(y)
    counts = np.unique(y, return_counts=True)[1]
    n_held = math.ceil(n * fraction)
    stratify = None
    if counts.min() >= 2 and n >= 2 * len(counts):
        n_held, stratify = min(max(n_held, len(counts)), n - len(counts)), y
    if not 0 < n_held < n:
        raise FeatxError(f"cannot hold out {fraction:.0%} of {n} rows; use more images or another fraction")
    kept, held = train_test_split(np.arange(n), test_size=n_held, random_state=seed, stratify=stratify)
    return np.sort(kept), np.sort(held)


def stratified_folds(y: np.ndarray, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training rows, held-out rows) of each of ``n_folds`` seeded, shuffled, stratified folds: every row is held out
    exactly once, by a model that did not train on it (out-of-fold predictions, as ``cross_val_predict``)."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    if np.unique(y, return_counts=True)[1].min() < n_folds:
        raise FeatxError(f"{n_folds} folds need at least {n_folds} rows of every class")
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    return [(np.sort(tr), np.sort(te)) for tr, te in folds]
def holdout_per_class(y: np.ndarray, n_held: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, held-out rows), both sorted: ``n_held[c]`` seeded random rows of every class ``c`` held out.

    For hold-outs whose size per class is set by a rule (a floor per class, a ceiling in all) rather than one fraction.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    held = [rng.permutation(np.flatnonzero(y == c))[: int(n_held.get(c, 0))] for c in np.unique(y)]
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(len(y)), held), held


def pick_split(names, preferred: tuple[str, ...]) -> str | None:
    """The first of ``preferred`` found among ``names`` (case-insensitive), as spelled in ``names``."""
    lower = {s.lower(): s for s in names}
    return next((lower[p] for p in preferred if p in lower), None)


def choose_splits(available: list[str], *, train: str | None = None, test: str | None = None,
                  labelled: set[str] | None = None, where: str = "the data",
                  options: tuple[str, str] = ("--train-split", "--test-split")) -> tuple[str, str | None]:
    """(training split, test split or None): the rule every command follows.

    Training: ``train``, else 'train'/'training', else the first split. Test: ``test``, else the
    first of :data:`TEST_SPLIT_NAMES` that holds labels; None (hold out part of the training split)
    when there is none, or when ``test`` names the training split itself.
    """
    if not available:
        raise FeatxError(f"{where} holds no rows; check that extraction read the images (see its skipped list)")

    def check(name: str, option: str) -> str:
        if name not in available:
            raise FeatxError(f"{where} has no split '{name}'; it has: {', '.join(available)}. Pass another {option}")
        return name

    train = check(train, options[0]) if train else pick_split(available, TRAIN_SPLIT_NAMES) or available[0]
    if test is None:
        candidates = [s for s in available if s != train and (labelled is None or s in labelled)]
        return train, pick_split(candidates, TEST_SPLIT_NAMES)
    return train, (None if test == train else check(test, options[1]))
