"""Which rows a head is fitted and tested on, decided from labels and splits alone (no features read yet)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..configs import FitHeadConfig
from ..errors import FeatxError
from ..files import jsonable
from ..head_folder import check_head_folder
from ..splits import choose_splits, stratified_holdout
from ..store import FeatureStore

__all__ = ["FitPlan", "plan_fit", "head_params", "sweep_grid", "memory_budget"]

_logger = logging.getLogger(__name__)


@dataclass
class FitPlan:
    """The rows a head is fitted and tested on, and where they came from."""

    key: str
    attrs: dict
    request: dict  # what the head folder records to recognise a rerun of the same fit
    class_names: list[str]
    dim: int
    train_split: str
    test_split: str | None
    holdout: dict | None  # {'split', 'fraction', 'seed'} when the test rows were held out of the training split
    test_description: str
    train_rows: np.ndarray  # row numbers in the group (labelled rows only), ascending
    test_rows: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    n_duplicates: int | None = None  # test rows whose image (same bytes) is also a training row; None: not recorded

    @property
    def train_bytes(self) -> int:
        """Memory the training features take as float32."""
        return len(self.train_rows) * self.dim * 4


def head_params(config: FitHeadConfig) -> dict:
    """The head step's parameters: ``--param`` values and ``--class-weight``."""
    return {**config.params, **({"class_weight": config.class_weight} if config.class_weight is not None else {})}


def sweep_grid(config: FitHeadConfig, valid_params) -> list[dict]:
    """The grid ``--sweep`` tries: the head's grid with ``--grid`` values replacing it per parameter, without the parameters
    fixed by ``--param``; checked (known parameters, positive numbers)."""
    from ..heads import HEADS, grid_of

    for name, values in config.grid.items():
        if name not in valid_params:
            raise FeatxError(f"--grid: head '{config.head}' has no parameter {name}; it has: {', '.join(sorted(valid_params))}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise FeatxError(f"--grid value {name}={v} is not a number; give numbers, e.g. --grid {name}=0.01,0.1,1")
            if v < 0 or (v == 0 and name != "weight_decay"):
                raise FeatxError(f"--grid value {name}={v} is not positive; regularisation values and k must be > 0")
    swept = {k: v for k, v in {**HEADS[config.head].grid, **config.grid}.items() if k not in config.params}
    return grid_of(config.head, swept) if swept else []


def plan_fit(store: FeatureStore, features, config: FitHeadConfig, out: Path | None) -> FitPlan:
    """Choose the splits and rows (refusing an output folder that holds another head; ``out=None``: no folder to check)."""
    key = store.resolve_key(config.model)
    train_split, test_split = choose_splits(store.split_names(key), train=config.train_split, test=config.test_split,
                                            labelled=store.labelled_splits(key), where=f"model '{key}' in '{features}'")
    attrs = store.attrs(key)
    request = {"head": config.head, "features": str(Path(features).resolve()), "model_key": key,
               "weights_sha256": attrs.get("weights_sha256"), "standardize": config.standardize,
               "l2_normalize": config.l2_normalize, "pca": config.pca, "params": jsonable(head_params(config)), "sweep": config.sweep,
               **({"tap_norm": True} if config.tap_norm else {}),
               "train_split": train_split, "test_split": test_split, "seed": config.seed}
    if out is not None:
        check_head_folder(out, request, config.overwrite)
    train_rows, y_train = _labelled(store, key, train_split, "training")
    holdout = None
    if test_split is not None:
        test_rows, y_test = _labelled(store, key, test_split, "test")
        description = f"split '{test_split}'"
    else:
        if len(train_rows) < 4:
            raise FeatxError(f"only {len(train_rows)} labelled rows: too few to hold out a test set; extract more images or pass --test-split")
        if not 0 < config.test_fraction < 1:
            raise FeatxError(f"--test-fraction must be between 0 and 1, got {config.test_fraction}")
        tr, te = stratified_holdout(y_train, config.test_fraction, config.seed)
        test_rows, y_test, train_rows, y_train = train_rows[te], y_train[te], train_rows[tr], y_train[tr]
        holdout = {"split": train_split, "fraction": config.test_fraction, "seed": config.seed}
        description = f"a seeded stratified {config.test_fraction:.0%} hold-out of '{train_split}'"
        _logger.info("no labelled test split: testing on %s", description)
    plan = FitPlan(key, attrs, request, store.class_names(key), store.feature_dim(key), train_split, test_split, holdout,
                   description, train_rows, test_rows, y_train, y_test)
    _check_trainable(plan, config)
    if holdout is None:
        _warn_class_coverage(plan)
    plan.n_duplicates = _shared_images(store, plan)
    return plan


def _shared_images(store: FeatureStore, plan: FitPlan) -> int | None:
    """How many test rows show an image that is also a training row (same bytes); warns when any does."""
    train, test = store.digests_of(plan.key, plan.train_rows), store.digests_of(plan.key, plan.test_rows)
    if train is None or test is None:
        return None
    n = int(np.isin(test[test != b""], train[train != b""]).sum())
    if n:
        _logger.warning("%d of the %d test rows show an image that is also in the training rows (same file content); "
                        "their predictions are not a test (a kNN head scores them perfectly): remove the duplicates from one split",
                        n, len(plan.test_rows))
    return n


def _labelled(store: FeatureStore, key: str, split: str, role: str) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers, labels) of the labelled rows of ``split``; an error naming the fix when none is labelled."""
    rows = store.row_numbers(key, split)
    y = store.labels_of(key, rows)
    mask = y >= 0
    if not mask.any():
        raise FeatxError(f"the {role} split '{split}' of '{key}' has no labels (label -1 = unlabeled); "
                         "extract labelled images (a <class>/<image> folder or a CSV manifest with a label column)")
    if not mask.all():
        _logger.warning("ignoring %d unlabeled rows of the %s split '%s'", int((~mask).sum()), role, split)
    return rows[mask], y[mask]


def _check_trainable(plan: FitPlan, config: FitHeadConfig) -> None:
    present = np.unique(plan.y_train)
    if len(present) < 2:
        raise FeatxError(f"the training split holds a single class ('{plan.class_names[present[0]]}'); "
                         "a classifier needs images of at least two classes")
    if config.pca and config.pca > min(len(plan.train_rows), plan.dim):
        raise FeatxError(f"--pca {config.pca} exceeds min(training rows, feature dimension) = {min(len(plan.train_rows), plan.dim)}")
    if config.head == "rbf-svm" and len(plan.train_rows) > 20000:
        _logger.warning("rbf-svm on %d rows is slow (cost grows with n^2); consider logreg or torch-linear", len(plan.train_rows))


def _warn_class_coverage(plan: FitPlan) -> None:
    """Name the classes that only one side has: the head cannot predict the first kind, the second goes unmeasured."""
    names = plan.class_names
    in_train, in_test = set(np.unique(plan.y_train).tolist()), set(np.unique(plan.y_test).tolist())
    if only_test := sorted(in_test - in_train):
        _logger.warning("classes only in the test rows, which the head can never predict: %s", ", ".join(names[c] for c in only_test))
    if only_train := sorted(in_train - in_test):
        _logger.warning("classes with training rows but no test rows (their accuracy is not measured): %s",
                        ", ".join(names[c] for c in only_train))


def memory_budget(config: FitHeadConfig) -> int:
    """Bytes the training features may take in memory: ``--max-memory`` GB, else half of the memory available now."""
    if config.max_memory is not None:
        return int(config.max_memory * 1e9)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):
        return 8 * 10**9
