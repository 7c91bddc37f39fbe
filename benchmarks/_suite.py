"""The fine-tuning robustness suite: regimes, and the split builder that keeps what is reported away from what chose.

Every regime has four disjoint parts of one data set, drawn per class from one seeded permutation:

* ``report_train`` and ``report_test``: the reported runs train on the first (which the run splits into its own
  training and validation images) and are scored once on the second; nothing is chosen on ``report_test``;
* ``search_train`` and ``search_test``: other images, for the recipe search, which may look at its test part.

Data sets with an official train/test split draw the training parts from its train split and the test parts from
its test split; digits (one split) draws all four from its images. CIFAR-10's report-test part also leaves out the
1,000 test images the earlier recipe search (``--experiments`` of featx 0.1) chose the lr and augmentation on.

Report rounds: once a report has been read, a change to the recipe may have been prompted by what it showed, so the
next report is scored on report-test images no earlier round scored (``report_round``): the search parts stay as they
are, and each round's report parts are the next unused images of the same per-class permutations. Data sets with two
splits get fresh training images too; digits (1,797 images) trains on images earlier rounds tested on, and a class with
too few unused images tests on all it has left (one image short in round 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featx.sources import ImageSource

__all__ = ["Regime", "REGIMES", "PARTS", "TooFewImages", "build_parts", "regime_source", "scaled_down", "old_search_test_images"]

PARTS = ("report_train", "report_test", "search_train", "search_test")
BUILD_SEED = 2024  # the permutation every part is cut from (the runs' own seeds are separate: see SEEDS in the script)


class TooFewImages(ValueError):
    """A regime's parts (or a report round's) need more images of a class than the data set has left."""


@dataclass(frozen=True)
class Regime:
    """One data regime of the suite: which images, how many per class in each part."""

    name: str
    dataset: str  # cifar10 | fashion-mnist | digits
    train_per_class: int  # report_train and search_train, each
    test_per_class: int  # report_test
    search_test_per_class: int
    classes: tuple[str, ...] | None = None  # a subset of the data set's classes (None: all)


REGIMES = [
    Regime("cifar10-10", "cifar10", 10, 100, 50),
    Regime("cifar10-25", "cifar10", 25, 100, 50),
    Regime("cifar10-100", "cifar10", 100, 100, 50),
    Regime("cifar10-500", "cifar10", 500, 100, 50),
    Regime("cat-dog-120", "cifar10", 120, 200, 100, ("cat", "dog")),
    Regime("airplane-ship-120", "cifar10", 120, 200, 100, ("airplane", "ship")),
    Regime("automobile-truck-120", "cifar10", 120, 200, 100, ("automobile", "truck")),
    Regime("fashion-mnist-25", "fashion-mnist", 25, 100, 50),
    Regime("fashion-mnist-500", "fashion-mnist", 500, 100, 50),
    Regime("digits", "digits", 45, 50, 30),
]


def scaled_down(regime: Regime) -> Regime:
    """The same regime with a few images per class (the slow test's and a smoke run's)."""
    return Regime(regime.name, regime.dataset, min(regime.train_per_class, 6), min(regime.test_per_class, 5),
                  min(regime.search_test_per_class, 3), regime.classes)


def old_search_test_images(src: ImageSource, per_class: int = 100, seed: int = 0) -> np.ndarray:
    """Indices of the test images featx 0.1's recipe search scored its variants on: ``subset()`` of that script (a seeded
    permutation per split and class, train split first, the first ``per_class`` test images of each class)."""
    rng = np.random.default_rng(seed)
    splits = np.asarray(src.splits)
    picked = []
    for split in ("train", "test"):
        for c in range(len(src.class_names)):
            members = rng.permutation(np.flatnonzero((splits == split) & (src.labels == c)))
            if split == "test":
                picked += members[:per_class].tolist()
    return np.asarray(sorted(picked), dtype=np.int64)


def build_parts(labels: np.ndarray, splits: list[str] | np.ndarray, class_names: list[str], regime: Regime,
                exclude_from_report: np.ndarray | None = None, report_round: int = 1) -> dict[str, np.ndarray]:
    """{part: sorted indices into the source} for every part of :data:`PARTS`; the parts are disjoint.

    ``exclude_from_report``: images that may go to the search parts but never to ``report_test``. ``report_round`` > 1:
    the report parts of that round (the search parts do not change), whose report-test images no earlier round's
    report-test part holds.
    """
    if report_round > 1:
        return _next_round(labels, splits, class_names, regime, exclude_from_report, report_round)
    excluded = np.zeros(0, np.int64) if exclude_from_report is None else np.asarray(exclude_from_report, dtype=np.int64)
    parts = {p: [] for p in PARTS}
    n_train, n_test, n_search = regime.train_per_class, regime.test_per_class, regime.search_test_per_class
    for c, train_pool, test_pool, two_splits in _class_pools(labels, splits, class_names, regime):
        if not two_splits:  # one permutation: its head tests, its tail trains
            test_pool, train_pool = test_pool[: n_test + n_search], train_pool[n_test + n_search:]
        report_test = test_pool[~np.isin(test_pool, excluded)][:n_test]
        search_test = test_pool[~np.isin(test_pool, report_test)][:n_search]
        if len(report_test) < n_test or len(search_test) < n_search or len(train_pool) < 2 * n_train:
            raise TooFewImages(f"{regime.name}: class {class_names[c]} has too few images for its parts")
        parts["report_test"] += report_test.tolist()
        parts["search_test"] += search_test.tolist()
        parts["report_train"] += train_pool[:n_train].tolist()
        parts["search_train"] += train_pool[n_train: 2 * n_train].tolist()
    return {p: np.asarray(sorted(v), dtype=np.int64) for p, v in parts.items()}


def _class_pools(labels, splits, class_names: list[str], regime: Regime):
    """(class, train pool, test pool, two splits?) per class of the regime, each pool a permutation drawn in turn from one
    generator seeded with :data:`BUILD_SEED`; with one split both pools are the same permutation of the class's images."""
    labels, splits = np.asarray(labels), np.asarray(splits)
    rng = np.random.default_rng(BUILD_SEED)
    two_splits = {"train", "test"} <= set(splits.tolist())
    for c in [class_names.index(c) for c in regime.classes] if regime.classes else range(len(class_names)):
        if two_splits:
            train_pool = rng.permutation(np.flatnonzero((labels == c) & (splits == "train")))
            yield c, train_pool, rng.permutation(np.flatnonzero((labels == c) & (splits == "test"))), True
        else:
            pool = rng.permutation(np.flatnonzero(labels == c))
            yield c, pool, pool, False


def regime_source(src: ImageSource, parts: dict[str, np.ndarray], which: str, regime: Regime) -> ImageSource:
    """The images a run of ``which`` ('report' or 'search') sees: its training part as split 'train', its test part as
    'test', classes renumbered to the regime's (a two-class regime has two classes)."""
    train, test = parts[f"{which}_train"], parts[f"{which}_test"]
    idx = np.concatenate([train, test])
    sub = src.subset(idx)
    sub.splits = ["train"] * len(train) + ["test"] * len(test)
    if regime.classes:
        old = [src.class_names.index(c) for c in regime.classes]
        sub.labels = np.asarray([old.index(int(y)) for y in sub.labels], dtype=np.int64)
        sub.class_names = list(regime.classes)
    sub.name = f"{regime.name}-{which}"
    return sub


def _next_round(labels, splits, class_names, regime: Regime, exclude_from_report, report_round: int) -> dict[str, np.ndarray]:
    """Round ``report_round``'s parts: the search parts of round 1, report parts from the images no earlier round reported on."""
    earlier = [build_parts(labels, splits, class_names, regime, exclude_from_report, r) for r in range(1, report_round)]
    first = earlier[0]
    used_test = np.concatenate([first["search_test"], first["search_train"], *(p["report_test"] for p in earlier),
                                *([] if exclude_from_report is None else [np.asarray(exclude_from_report, np.int64)])])
    parts = {p: list(first[p]) for p in ("search_train", "search_test")} | {"report_train": [], "report_test": []}
    for c, train_pool, test_pool, two_splits in _class_pools(labels, splits, class_names, regime):
        used_train = [first["search_train"], first["search_test"]] + ([p["report_train"] for p in earlier] if two_splits else [])
        report_test = test_pool[~np.isin(test_pool, used_test)][: regime.test_per_class]
        report_train = train_pool[~np.isin(train_pool, np.concatenate([*used_train, report_test]))][: regime.train_per_class]
        short = len(report_test) < (regime.test_per_class if two_splits else regime.test_per_class * 9 // 10)
        if short or len(report_train) < regime.train_per_class:
            raise TooFewImages(f"{regime.name}: class {class_names[c]} has too few unused images for report round {report_round}")
        parts["report_test"] += report_test.tolist()
        parts["report_train"] += report_train.tolist()
    return {p: np.asarray(sorted(v), dtype=np.int64) for p, v in parts.items()}
