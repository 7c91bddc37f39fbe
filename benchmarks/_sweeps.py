"""The sweep section of benchmarks/heads.py: featx's sweeps against scikit-learn's over the same grid and validation split.

For logreg, ridge and kNN on cached Lite0 embeddings (by default the full CIFAR-10: 50,000 train, 10,000 test, 224 px):
featx's ``sweep`` (the C path in one batched, warm-started L-BFGS run; every alpha from one eigendecomposition; every k from
one neighbour search) against a scikit-learn loop fitting ``StandardScaler + estimator`` once per grid value on the same
training/validation rows (``featx.heads._sweep.validation_split``), each choosing on validation, refitting on all training
rows and scoring the test split once. One run, after a warm-up, so the times compare as ratios.
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.linear_model import RidgeClassifier as SkRidge
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featx.heads import HEADS, grid_of, make_head, sweep
from featx.heads._sweep import validation_split

SKLEARN = {
    "logreg": lambda v: make_pipeline(StandardScaler(), LogisticRegression(C=v["C"], max_iter=1000)),
    "ridge": lambda v: make_pipeline(StandardScaler(), SkRidge(alpha=v["alpha"])),
    "knn": lambda v: KNeighborsClassifier(n_neighbors=v["n_neighbors"], metric="cosine", algorithm="brute"),
}


def featx_sweep(name: str, Xtr, ytr, Xte, yte, device: str, seed: int) -> dict:
    t0 = time.perf_counter()
    pipe, result = sweep(make_head(name, device=device, random_state=seed), Xtr, ytr, grid_of(name), random_state=seed)
    seconds = time.perf_counter() - t0
    iterations = [c.get("iterations") for c in result.curve if "iterations" in c]
    return {"seconds": seconds, "chosen": result.best, "val": result.best_val_accuracy, "test": float((pipe.predict(Xte) == yte).mean()),
            "iterations": sum(iterations) if iterations else None}


def sklearn_sweep(name: str, Xtr, ytr, Xte, yte, seed: int) -> dict:
    grid = grid_of(name)
    idx_tr, idx_va = validation_split(ytr, 0.2, seed)  # the rows featx's sweep uses
    t0 = time.perf_counter()
    scores = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at weak C: part of what is measured
        for entry in grid:
            scores.append(SKLEARN[name](entry).fit(Xtr[idx_tr], ytr[idx_tr]).score(Xtr[idx_va], ytr[idx_va]))
            logging.info("scikit-learn %s %s: validation %.4f (%.0f s so far)", name, entry, scores[-1], time.perf_counter() - t0)
        best = grid[int(np.argmax(scores))]
        final = SKLEARN[name](best).fit(Xtr, ytr)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "chosen": best, "val": max(scores), "test": float(final.score(Xte, yte))}


def run(data, heads: list[str], device: str, seed: int, skip_sklearn: tuple = ()) -> list[dict]:
    (Xtr, ytr), (Xte, yte) = data
    few = np.random.default_rng(seed).permutation(len(ytr))[:500]  # warm-up: BLAS and torch kernels initialised outside the timings
    make_head("logreg", device=device).fit(Xtr[few], ytr[few])
    rows = []
    for name in heads:
        ours = featx_sweep(name, Xtr, ytr, Xte, yte, device, seed)
        logging.info("featx %s: %.1f s, chose %s, test %.4f", name, ours["seconds"], ours["chosen"], ours["test"])
        theirs = None if name in skip_sklearn else sklearn_sweep(name, Xtr, ytr, Xte, yte, seed)
        rows.append({"head": name, "grid": len(grid_of(name)), "featx": ours, "sklearn": theirs})
    return rows


def _fmt(values: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


TARGETS = {"logreg": 10.0, "ridge": 5.0, "knn": 5.0}


def render(rows: list[dict], n_train: int, n_test: int, dim: int, source: str) -> list[str]:
    lines = ["### Sweeps: featx against scikit-learn over the same grid and validation split", "",
             f"Features: {source}; {n_train} training rows ({int(n_train * 0.8)} fit / {n_train - int(n_train * 0.8)} validation "
             f"inside the sweep), {n_test} test rows, {dim} dimensions. Each side chooses on validation, refits on all training "
             "rows and scores the test split once; times include the refit.", "",
             "| head | grid | featx s | scikit-learn s | speed ratio | target | featx chose | scikit-learn chose | featx test | "
             "scikit-learn test | difference (points) |", "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        f, s = r["featx"], r["sklearn"]
        if s is None:
            lines.append(f"| {r['head']} | {r['grid']} | {f['seconds']:.1f} | not run | | | {_fmt(f['chosen'])} | | {f['test']:.4f} | | |")
            continue
        ratio = s["seconds"] / max(f["seconds"], 1e-9)
        lines.append(f"| {r['head']} | {r['grid']} | {f['seconds']:.1f} | {s['seconds']:.1f} | {ratio:.1f}x | >= {TARGETS[r['head']]:.0f}x "
                     f"{'ok' if ratio >= TARGETS[r['head']] else 'MISSED'} | {_fmt(f['chosen'])} | {_fmt(s['chosen'])} | {f['test']:.4f} | "
                     f"{s['test']:.4f} | {100 * (f['test'] - s['test']):+.2f} |")
    grids = "; ".join(f"{h}: {', '.join(f'{k} {v[0]:g}..{v[-1]:g} ({len(v)})' for k, v in HEADS[h].grid.items())}" for h in ("logreg", "ridge", "knn"))
    lines += ["", f"Grids: {grids}. Accuracy target: logreg within 0.3 points of scikit-learn."]
    return lines
