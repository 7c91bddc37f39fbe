"""``--sweep``: choose a head's regularisation on a validation split carved from the training rows.

:class:`SweptHead` is a scikit-learn meta-estimator, like ``LogisticRegressionCV``: the workflow
calls ``fit`` and the strategy (one batched pass for the torch linear head, one fit per value
otherwise) lives behind it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils._available_if import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ..errors import FeatxError
from ..splits import stratified_holdout
from ..statistics import mcnemar_exact, wilson_interval
from ._progress import progress_bar

__all__ = ["SweepResult", "SweptHead", "sweep"]

_logger = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """What ``--sweep`` tried and chose."""

    params: list[str]  # swept parameter names
    curve: list[dict] = field(default_factory=list)  # [{'params': {...}, 'val_accuracy': float[, 'iterations': int]}], grid order
    best: dict = field(default_factory=dict)  # chosen parameter values
    best_val_accuracy: float = float("nan")
    n_train: int = 0  # rows the grid was trained on
    n_val: int = 0  # rows it was scored on
    seconds: float = 0.0  # time of the grid (without the refit)
    batched: bool = False  # True when the grid was solved together (one batched solve, factorisation or neighbour search)
    edges: list[dict] = field(default_factory=list)  # chosen values at the end of their grid: {'param', 'value', 'side', 'next'}
    n_tied: int = 0  # grid entries tied with the best on validation (exact McNemar, p >= TIE_P_VALUE); the choice is their middle

    def to_dict(self) -> dict:
        return {"params": self.params, "best": self.best, "best_val_accuracy": self.best_val_accuracy,
                "best_val_accuracy_ci": self.best_val_accuracy_ci, "curve": self.curve,
                "n_train": self.n_train, "n_val": self.n_val, "seconds": self.seconds, "batched": self.batched,
                "edges": self.edges, "n_tied": self.n_tied}

    @property
    def best_val_accuracy_ci(self) -> list[float] | None:
        """Wilson's 95% interval of the chosen entry's validation accuracy (None without validation rows)."""
        if not self.n_val:
            return None
        return list(wilson_interval(round(self.best_val_accuracy * self.n_val), self.n_val))

    def edge_notes(self) -> list[str]:
        """One sentence per chosen value at the edge of its grid, saying how to extend the grid."""
        return [f"the chosen {e['param']}={e['value']:g} is the {'smallest' if e['side'] == 'low' else 'largest'} value of the grid; "
                f"the best may lie {'below' if e['side'] == 'low' else 'above'} it: extend the grid to {e['next']:g} "
                f"(--param {e['param']}=VALUE fits one value)" for e in self.edges]


def grid_edges(grid: list[dict], best: dict, scores: list[float]) -> list[dict]:
    """Swept numeric parameters (3 values or more) whose chosen value is the smallest or largest of the grid,
    unless every value scored the same; ``next`` is one more step of the grid's spacing beyond the edge."""
    edges = []
    if max(scores) == min(scores):
        return edges
    for name, value in best.items():
        values = sorted({e[name] for e in grid if isinstance(e.get(name), (int, float)) and not isinstance(e.get(name), bool)})
        if len(values) < 3 or value not in (values[0], values[-1]):
            continue
        low = value == values[0]
        a, b = (values[0], values[1]) if low else (values[-2], values[-1])
        geometric = a > 0 and b / a > 1.5
        step = (b / a) if geometric else (b - a)
        nxt = (value / step if low else value * step) if geometric else (value - step if low else value + step)
        edges.append({"param": name, "value": value, "side": "low" if low else "high", "next": float(nxt)})
    return edges


def validation_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The sweep's (train rows, validation rows): the stratified hold-out every class must appear in."""
    counts = np.unique(y, return_counts=True)[1]
    if counts.min() < 2:
        raise FeatxError("a class has a single training example, too few for a validation split; drop --sweep")
    if len(y) < 2 * len(counts):
        raise FeatxError(f"{len(y)} training rows are too few to carve a validation split for --sweep; drop --sweep")
    return stratified_holdout(y, val_fraction, seed)


def _preprocessing(pipeline, X_tr, y_tr):
    """The pipeline's preprocessing steps fitted on the training rows (None when the head is the only step)."""
    return None if len(pipeline) == 1 else clone(pipeline[:-1]).fit(X_tr, y_tr)


def _through(pre, *arrays):
    """``arrays`` through the fitted preprocessing ``pre`` (as they are when it is None)."""
    return arrays if pre is None else tuple(pre.transform(a) for a in arrays)


def _transformed(pipeline, X_tr, y_tr, X_va):
    """The training and validation rows through the pipeline's preprocessing, fitted on the training rows."""
    return _through(_preprocessing(pipeline, X_tr, y_tr), X_tr, X_va)


def _scored(correct: np.ndarray, **extra) -> dict:
    """A grid entry's validation result: its accuracy (in the curve) and which rows it got right (for the tie test)."""
    return {"val_accuracy": float(np.mean(correct)), **extra, "correct": np.asarray(correct, dtype=bool)}


def _scores_together(pipeline, grid, X_tr, y_tr, X_va, y_va) -> tuple[list[dict], tuple | None]:
    """(validation scores of every grid entry from one batched computation, (fitted preprocessing, fitted heads) or None):
    the head's ``grid_correct`` (one neighbour search) or ``fit_grid`` (one batched solve or factorisation)."""
    pre = _preprocessing(pipeline, X_tr, y_tr)
    Z_tr, Z_va = _through(pre, X_tr, X_va)
    head = clone(pipeline.named_steps["head"])
    if hasattr(head, "grid_correct"):
        return [_scored(c) for c in head.grid_correct(Z_tr, y_tr, Z_va, y_va, grid)], None
    out, fitted = [], head.fit_grid(Z_tr, y_tr, grid)
    for est in fitted:
        extra = {"iterations": est.n_iter_, "converged": est.converged_} if hasattr(est, "n_iter_") else {}
        out.append(_scored(est.predict(Z_va) == y_va, **extra))
    return out, (pre, fitted)


def _scores_per_value(pipeline, grid, X_tr, y_tr, X_va, y_va) -> tuple[list[dict], None]:
    """Validation scores of every grid entry, one fit each."""
    scores = []
    with progress_bar(len(grid), "sweep", unit="value") as bar:
        for entry in grid:
            est = clone(pipeline).set_params(**{f"head__{k}": v for k, v in entry.items()})
            scores.append(_scored(est.fit(X_tr, y_tr).predict(X_va) == y_va))
            bar.update()
    return scores, None


_STATELESS_STEPS = ("Normalizer", "TapNormalizer")  # row-wise: the same map whichever rows they were fitted on


def _standardisation_map(pre_fit, pre_all) -> tuple | None:
    """(scale [D], shift [D]) with ``pre_fit(u) = pre_all(u) * scale + shift`` for every input ``u``: the two fits of a
    preprocessing of row-wise steps and at most one ``StandardScaler`` differ by that per-feature affine map. None when
    another step (PCA, say) makes the map anything else."""
    steps_fit = [] if pre_fit is None else [step for _, step in pre_fit.steps]
    steps_all = [] if pre_all is None else [step for _, step in pre_all.steps]
    scale, shift = 1.0, 0.0
    for a, b in zip(steps_fit, steps_all):
        name = type(a).__name__
        if name == "StandardScaler":
            m, s = (0.0 if a.mean_ is None else a.mean_), (1.0 if a.scale_ is None else a.scale_)
            m2, s2 = (0.0 if b.mean_ is None else b.mean_), (1.0 if b.scale_ is None else b.scale_)
            scale, shift = np.asarray(s2 / s), np.asarray((m2 - m) / s)
        elif name not in _STATELESS_STEPS:
            return None
    return scale, shift


def _refit(pipeline, X, y, warm: tuple | None):
    """``pipeline`` fitted on all rows. A head with ``warm_start`` starts from the chosen grid model (``warm``: the grid's
    fitted preprocessing and that model), its weights carried to the refit's standardisation (same logits); on
    CIFAR-10's 50,000 Lite0 rows this took the logistic refit from 36 L-BFGS iterations to 12."""
    head = pipeline.steps[-1][1]
    if warm is None or "warm_start" not in head.get_params() or not hasattr(warm[1], "coef_"):
        return pipeline.fit(X, y)
    pre_fit, chosen = warm
    pre_all = None if len(pipeline) == 1 else pipeline[:-1].fit(X, y)  # the slice shares the pipeline's step objects
    carried = _standardisation_map(pre_fit, pre_all)
    (Z,) = _through(pre_all, X)
    if carried is None:
        head.fit(Z, y)
        return pipeline
    scale, shift = carried
    head.coef_ = (chosen.coef_ * scale).astype(np.float32)
    head.intercept_ = (chosen.intercept_ + chosen.coef_ @ np.broadcast_to(shift, chosen.coef_.shape[1:])).astype(np.float32)
    head.set_params(warm_start=True).fit(Z, y)
    head.set_params(warm_start=False)
    return pipeline


class SweptHead(ClassifierMixin, BaseEstimator):
    """``pipeline`` with its head's parameters chosen among ``grid`` on a validation split, then refit on all rows.

    ``grid`` is a list of dicts of head parameters; ties go to the middle one of the tied entries. Fitted attributes:
    ``best_params_``, ``best_estimator_`` (the refit pipeline), ``result_`` (:class:`SweepResult`).
    """

    def __init__(self, pipeline, grid: list[dict], *, val_fraction: float = 0.2, random_state: int = 0):
        self.pipeline = pipeline
        self.grid = grid
        self.val_fraction = val_fraction
        self.random_state = random_state

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=None)
        check_classification_targets(y)
        if len(np.unique(y)) < 2:
            raise ValueError(f"SweptHead needs at least 2 classes in y; got 1 class: {np.unique(y)[0]!r}")
        result = SweepResult(params=sorted({k for g in self.grid for k in g}))
        warm = None
        if self.grid:
            warm = self._search(X, y, result)
        else:
            self._score_as_is(X, y, result)
        final = clone(self.pipeline).set_params(**{f"head__{k}": v for k, v in result.best.items()})
        self.best_estimator_ = _refit(final, X, y, warm)
        self.best_params_, self.result_ = dict(result.best), result
        self.classes_ = self.best_estimator_.classes_
        return self

    def _score_as_is(self, X, y, result: SweepResult) -> None:
        """Nothing to choose: the head's validation accuracy as it is, on the split a sweep would use, so every head of a
        comparison has one (left out when the rows are too few for a validation split)."""
        try:
            idx_tr, idx_va = validation_split(y, self.val_fraction, self.random_state)
        except FeatxError:
            return
        result.n_train, result.n_val = len(idx_tr), len(idx_va)
        t0 = time.perf_counter()
        result.best_val_accuracy = float(clone(self.pipeline).fit(X[idx_tr], y[idx_tr]).score(X[idx_va], y[idx_va]))
        result.seconds = time.perf_counter() - t0

    def _search(self, X, y, result: SweepResult) -> tuple | None:
        """Fill ``result``; return (the grid's fitted preprocessing, the chosen model) when the grid was fitted together
        (the refit can start from it), else None."""
        idx_tr, idx_va = validation_split(y, self.val_fraction, self.random_state)
        result.n_train, result.n_val = len(idx_tr), len(idx_va)
        head = self.pipeline.named_steps["head"]
        batched = (hasattr(head, "fit_grid") or hasattr(head, "grid_correct")) and getattr(head, "grid_batched", True)
        strategy = _scores_together if batched else _scores_per_value
        t0 = time.perf_counter()
        scored, fitted = strategy(self.pipeline, self.grid, X[idx_tr], y[idx_tr], X[idx_va], y[idx_va])
        _record(result, self.grid, scored, time.perf_counter() - t0, batched)
        return None if fitted is None else (fitted[0], fitted[1][self.grid.index(result.best)])

    def _checked(self, X):
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=None)

    def predict(self, X):
        X = self._checked(X)
        return self.best_estimator_.predict(X)

    @available_if(lambda self: hasattr(self.pipeline, "predict_proba"))
    def predict_proba(self, X):
        X = self._checked(X)
        return self.best_estimator_.predict_proba(X)

    def decision_function(self, X):
        X = self._checked(X)
        return self.best_estimator_.decision_function(X)


# Grid entries whose validation predictions the exact McNemar test cannot tell from the best's at this level are ties.
TIE_P_VALUE = 0.05


def tied_with_best(correct: list[np.ndarray], alpha: float = TIE_P_VALUE) -> list[int]:
    """Indices of the grid entries tied with the best on the validation rows (``correct[i]``: which rows entry i got right).

    The best is the middle one of the entries with the highest accuracy; an entry ties with it when the two-sided exact
    McNemar test on the same rows gives p >= ``alpha``. Accuracies a few rows apart are noise, not a ranking: on a flat
    curve they move with the thread count (float32 reductions, features and solver paths that differ in the last bits),
    and a choice made on them moved with it.
    """
    scores = np.array([c.mean() for c in correct])
    top = np.flatnonzero(scores == scores.max())
    ref = correct[int(top[len(top) // 2])]
    return [i for i, c in enumerate(correct) if scores[i] == scores.max() or mcnemar_exact(ref, c) >= alpha]


def _record(result: SweepResult, grid: list[dict], scored: list[dict], seconds: float, batched: bool) -> None:
    """Fill ``result`` from the grid's validation scores: curve, choice, edges.

    The choice is the middle one (in grid order) of the entries tied with the best (:func:`tied_with_best`): on easy
    data every C from 1e-5 up may score 1.0 on validation, and the first (the strongest regularisation) refits into a
    head that predicts one class; on a flat curve the middle of the tied range stays put when single rows flip.
    """
    result.seconds, result.batched = seconds, batched
    correct = [s.pop("correct") for s in scored]
    result.curve = [{"params": entry, **s} for entry, s in zip(grid, scored)]
    scores = [s["val_accuracy"] for s in scored]
    tied = tied_with_best(correct)
    best = tied[len(tied) // 2]
    for k in tied:
        result.curve[k]["tied"] = True
    result.best, result.best_val_accuracy, result.n_tied = dict(grid[best]), scores[best], len(tied)
    result.edges = grid_edges(grid, result.best, scores)
    _logger.debug("sweep %s: best %s (validation accuracy %.4f)", result.params, result.best, result.best_val_accuracy)


def _correct_on_rows(head, rows) -> np.ndarray:
    """Which rows of :class:`~featx.heads._rows.Rows` a fitted head classifies right (chunk by chunk; ``rows.y`` are class indices)."""
    import torch  # rows streamed from disk are torch heads' business; sweeps of scikit-learn heads never load torch

    return np.concatenate([head.predict(X.numpy()) == head.classes_[y.numpy()] for X, y in rows.chunks(torch.device("cpu"))])


def sweep_rows(head, rows, classes: np.ndarray, n_features: int, grid: list[dict], *, val_fraction: float = 0.2,
               random_state: int = 0):
    """(head refit on all ``rows`` with the chosen values, :class:`SweepResult`) for rows streamed from disk.

    The same rule as :class:`SweptHead`: a stratified validation split of the rows, the grid trained together when
    the head can (``fit_grid_rows``), else one fit per value.
    """
    result = SweepResult(params=sorted({k for g in grid for k in g}))
    if grid:
        idx_tr, idx_va = validation_split(rows.y, val_fraction, random_state)
        train, val = rows.subset(idx_tr), rows.subset(idx_va)
        result.n_train, result.n_val = len(train), len(val)
        t0 = time.perf_counter()
        batched = hasattr(head, "fit_grid_rows")
        if batched:
            fitted = clone(head).fit_grid_rows(train, classes, n_features, grid)
        else:
            fitted = [clone(head).set_params(**entry).fit_rows(train, classes, n_features) for entry in grid]
        _record(result, grid, [_scored(_correct_on_rows(est, val)) for est in fitted], time.perf_counter() - t0, batched)
    final = clone(head).set_params(**result.best).fit_rows(rows, classes, n_features)
    return final, result


def sweep(pipeline, X: np.ndarray, y: np.ndarray, grid: list[dict], *, val_fraction: float = 0.2,
          random_state: int = 0):
    """(refit pipeline, :class:`SweepResult`): :class:`SweptHead` fitted on (X, y)."""
    swept = SweptHead(pipeline, grid, val_fraction=val_fraction, random_state=random_state).fit(X, y)
    return swept.best_estimator_, swept.result_
