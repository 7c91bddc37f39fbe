"""Sweeps at the speed of the hardware: logreg's C grid in one path solve, ridge's alphas from one factorisation,
kNN's ks from one neighbour search, and heads fitted on stores larger than a memory cap."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.linear_model import RidgeClassifier as SkRidge
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from featx import ExtractConfig, FitHeadConfig, extract, fit_head, load_features
from featx.cli import main
from featx.heads import KNNClassifier, LogisticRegressionClassifier, RidgeClassifier, grid_edges
from featx.sources import FASHION_MNIST_DIR, resolve_source

pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n_per_class=60, n_classes=3, dim=16, spread=2.5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (n_classes, dim))
    X = np.concatenate([c + rng.normal(0, spread, (n_per_class, dim)) for c in centres]).astype(np.float32)
    return X, np.repeat(np.arange(n_classes), n_per_class)


@pytest.fixture(scope="module")
def fashion_lite0(tmp_path_factory, lite0_weights):
    """Real embeddings: 2,000 train / 1,000 test Fashion-MNIST images through ImageNet EfficientNet-Lite0 at 64 px, standardised."""
    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip("needs 'apt-get install dataset-fashion-mnist'")
    src = resolve_source("fashion-mnist")
    rng = np.random.default_rng(0)
    splits = np.asarray(src.splits)
    idx = np.concatenate([rng.permutation(np.flatnonzero(splits == s))[:n] for s, n in (("train", 2000), ("test", 1000))])
    out = tmp_path_factory.mktemp("fmnist") / "f.h5"
    extract(src.subset(np.sort(idx)), ExtractConfig(model="tf_efficientnet_lite0", weights=lite0_weights, img_size=64, batch_size=128,
                                                    progress=False), out)
    tr, te = load_features(out, split="train"), load_features(out, split="test")
    scaler = StandardScaler().fit(tr.X)
    return scaler.transform(tr.X).astype(np.float32), tr.y, scaler.transform(te.X).astype(np.float32), te.y


def _penalised_loss(est, X, y, C: float) -> float:
    """Scikit-learn's multinomial objective: C x the summed log-loss + half the squared weights."""
    from sklearn.metrics import log_loss

    return float(C * len(y) * log_loss(y, est.predict_proba(X), labels=est.classes_) + 0.5 * np.sum(np.square(est.coef_)))


def test_logreg_path_matches_scikit_learn_per_C_on_real_embeddings(fashion_lite0):
    """Each C's model is scikit-learn's optimum up to the solver's tolerance, as scikit-learn's own default lbfgs is: both
    are measured against lbfgs run to tol 1e-10. (At C = 0.1 the default lbfgs stopped 2 test images from that optimum and
    featx 3: a tolerance-sized gap, where a test against the default solver alone read noise as a difference.)"""
    Xtr, ytr, Xte, yte = fashion_lite0
    Cs = [1e-3, 1e-2, 1e-1]
    fitted = LogisticRegressionClassifier(device="cpu").fit_grid(Xtr, ytr, [{"C": c} for c in Cs])
    for C, est in zip(Cs, fitted):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            default = LogisticRegression(C=C, max_iter=1000).fit(Xtr, ytr)
            optimum = LogisticRegression(C=C, max_iter=20000, tol=1e-10).fit(Xtr, ytr)
        best = _penalised_loss(optimum, Xtr, ytr, C)
        for model in (est, default):
            assert abs(model.score(Xte, yte) - optimum.score(Xte, yte)) <= 0.005, (C, model)
            assert _penalised_loss(model, Xtr, ytr, C) <= best * 1.005, (C, model)
            assert np.abs(model.predict_proba(Xte) - optimum.predict_proba(Xte)).mean() < 0.005, (C, model)
        assert est.converged_


def test_logreg_path_over_several_blocks_matches_scikit_learn_per_C():
    """Nine C values, so the warm-started path crosses blocks of ``heads_per_pass`` (4): each block starts from the
    previous block's solution and curvature pairs. Scikit-learn's digits (64 standardised pixels, 10 classes)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    Xtr, ytr, Xte = X[:1200], y[:1200], X[1200:]
    Cs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
    head = LogisticRegressionClassifier(tol=1e-6, device="cpu")
    assert len(Cs) > 2 * head.heads_per_pass
    fitted = head.fit_grid(Xtr, ytr, [{"C": c} for c in Cs])
    for C, est in zip(Cs, fitted):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = LogisticRegression(C=C, tol=1e-6, max_iter=5000).fit(Xtr, ytr)
        assert est.converged_, C
        assert np.abs(est.predict_proba(Xte) - ref.predict_proba(Xte)).max() < 0.02, C  # both within tol of one optimum
        assert np.mean(est.predict(Xte) == ref.predict(Xte)) >= 0.995, C


def test_kronecker_preconditioner_inverts_the_kronecker_hessian_and_leaves_the_intercept_still_along_ones():
    """Weights: exactly (Sigma (x) S + penalty I)^-1 (S with its all-ones direction at curvature 0); intercept: the
    pseudo-inverse of S, nothing along the all-ones direction (softmax does not change along it)."""
    import torch

    from featx.heads._logreg import KroneckerPreconditioner

    g = torch.Generator().manual_seed(0)
    D, K = 7, 4
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    sigma = A @ A.T / D
    p = torch.softmax(torch.randn(50, K, generator=g, dtype=torch.float64), 1)
    S = (torch.diag(p.sum(0)) - p.T @ p) / 50  # a real class curvature: S 1 = 0
    penalties = torch.tensor([1e-1, 1e-3], dtype=torch.float64)
    pre = KroneckerPreconditioner(torch.linalg.eigh(sigma), S, penalties)
    q = torch.randn(2, D * K + K, generator=g, dtype=torch.float64)
    out = pre(q)
    for h in range(2):
        H = torch.kron(sigma, S) + penalties[h] * torch.eye(D * K, dtype=torch.float64)  # theta's W is [D, K] row-major
        torch.testing.assert_close(out[h, : D * K], torch.linalg.solve(H, q[h, : D * K]))
        torch.testing.assert_close(out[h, D * K :], torch.linalg.pinv(S) @ q[h, D * K :])
    assert abs(float(out[:, D * K :].sum(1).abs().max())) < 1e-9  # no step along the all-ones intercept direction


def test_preconditioned_path_takes_fewer_iterations_to_the_same_models():
    """On correlated features (as embeddings are: a spectrum spanning 2.5 decades after standardisation) the preconditioned
    grid reaches the plain one's models (the identity as the initial inverse Hessian) in under half its iterations."""
    import featx.heads._logreg as logreg

    rng = np.random.default_rng(0)
    n, D, K = 1500, 48, 5
    rotation = np.linalg.qr(rng.normal(size=(D, D)))[0]
    X = (rng.normal(size=(n, D)) * np.geomspace(1, 0.02, D)) @ rotation.T
    y = np.argmax(X @ rng.normal(size=(D, K)) * 3 + rng.normal(size=(n, K)), 1)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    grid = [{"C": c} for c in (1e-2, 0.1, 1.0, 10.0)]
    pre = LogisticRegressionClassifier(device="cpu").fit_grid(X, y, grid)
    plain_max = logreg.PRECONDITIONED_MAX_DIM
    try:
        logreg.PRECONDITIONED_MAX_DIM = 0
        plain = LogisticRegressionClassifier(device="cpu").fit_grid(X, y, grid)
    finally:
        logreg.PRECONDITIONED_MAX_DIM = plain_max
    assert all(e.converged_ for e in pre + plain)
    assert sum(e.n_iter_ for e in pre) < 0.5 * sum(e.n_iter_ for e in plain), ([e.n_iter_ for e in pre], [e.n_iter_ for e in plain])
    for a, b in zip(pre, plain):  # both within the gradient tolerance of one optimum
        assert np.abs(a.predict_proba(X) - b.predict_proba(X)).max() < 0.05
        assert np.mean(a.predict(X) == b.predict(X)) >= 0.995


def test_sweep_refit_starts_from_the_chosen_grid_model_and_lands_where_a_cold_refit_does():
    """The refit on all rows starts from the chosen C's grid model, its weights carried to the new standardisation:
    fewer iterations, the same model. With PCA in the pipeline (no per-feature map) the refit starts cold."""
    from sklearn.datasets import load_digits
    from sklearn.base import clone

    from featx.heads import make_head, sweep

    X, y = load_digits(return_X_y=True)
    X = (X + np.random.default_rng(0).normal(0, 0.5, X.shape)).astype(np.float32)  # no constant columns: a real scaler map
    pipeline = make_head("logreg", device="cpu", params={"tol": 1e-6})
    grid = [{"C": c} for c in (1e-3, 1e-2, 0.1)]
    warm, result = sweep(pipeline, X, y, grid)
    cold = clone(pipeline).set_params(head__C=result.best["C"]).fit(X, y)
    assert warm[-1].n_iter_ < cold[-1].n_iter_, (warm[-1].n_iter_, cold[-1].n_iter_)
    assert warm[-1].warm_start is False  # the refit leaves the parameter as it was
    np.testing.assert_allclose(warm.predict_proba(X), cold.predict_proba(X), atol=2e-3)
    with_pca = make_head("logreg", device="cpu", pca=20)
    refit, result = sweep(with_pca, X, y, grid)
    np.testing.assert_allclose(refit.predict_proba(X), clone(with_pca).set_params(head__C=result.best["C"]).fit(X, y).predict_proba(X),
                               atol=1e-6)


def test_logreg_equals_its_scikit_learn_solver_and_handles_two_classes_and_weights():
    X, y = blobs(n_classes=2)
    y[:40] = 0  # imbalanced
    for kw in ({}, {"class_weight": "balanced"}):
        ours = LogisticRegressionClassifier(C=0.5, tol=1e-7, device="cpu", **kw).fit(X, y)
        theirs = LogisticRegressionClassifier(C=0.5, tol=1e-7, solver="sklearn", **kw).fit(X, y)
        np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=2e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sk = LogisticRegression(C=0.5, tol=1e-7, max_iter=5000, **kw).fit(X, y)
        np.testing.assert_allclose(ours.decision_function(X), sk.decision_function(X), atol=2e-3)


def test_ridge_every_alpha_from_one_factorisation_equals_scikit_learn():
    X, y = blobs(n_classes=4)
    alphas = [0.01, 1.0, 100.0]
    for est, a in zip(RidgeClassifier(device="cpu").fit_grid(X, y, [{"alpha": a} for a in alphas]), alphas):
        ref = SkRidge(alpha=a).fit(X, y)
        np.testing.assert_allclose(est.coef_, ref.coef_, atol=1e-4)
        np.testing.assert_allclose(est.decision_function(X), ref.decision_function(X), atol=1e-3)
    binary = RidgeClassifier(alpha=3.0, device="cpu").fit(X, y % 2)
    np.testing.assert_allclose(binary.decision_function(X), SkRidge(alpha=3.0).fit(X, y % 2).decision_function(X), atol=1e-3)


def test_ridge_auto_alpha_is_the_leave_one_out_choice():
    X, y = blobs(n_per_class=15, n_classes=3, dim=30, spread=4.0, seed=1)
    auto = RidgeClassifier(device="cpu").fit(X, y)
    from featx.heads._ridge import RIDGE_ALPHAS

    def loo_accuracy(alpha):  # brute force: refit without each row
        hits = [SkRidge(alpha=alpha).fit(np.delete(X, i, 0), np.delete(y, i)).predict(X[i : i + 1])[0] == y[i] for i in range(len(y))]
        return np.mean(hits)

    brute = [loo_accuracy(a) for a in RIDGE_ALPHAS]
    assert max(brute) > min(brute)  # the curve has a peak to find
    assert auto.alpha_ == RIDGE_ALPHAS[int(np.argmax(brute))]  # the first alpha of the best leave-one-out accuracy
    fast = RidgeClassifier(device="cpu")
    fast._validate()
    fast.classes_ = np.unique(y)
    fact = fast._factorise(X, y)
    rows_V = fact._Xc @ fact.eig[1].float()
    import torch

    ours = [fact.loo_accuracy(a, torch.as_tensor(y), rows_V) for a in RIDGE_ALPHAS]
    np.testing.assert_allclose(ours, brute, atol=1e-9)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_every_k_from_one_search_equals_one_fit_per_k(metric):
    X, y = blobs(n_per_class=40, n_classes=3, spread=3.0)
    Xv, yv = blobs(n_per_class=10, n_classes=3, spread=3.0, seed=5)
    grid = [{"n_neighbors": k} for k in (1, 5, 15)]
    together = KNNClassifier(metric=metric, device="cpu").grid_scores(X, y, Xv, yv, grid)
    alone = [KNeighborsClassifier(n_neighbors=e["n_neighbors"], metric=metric, algorithm="brute").fit(X, y).score(Xv, yv) for e in grid]
    np.testing.assert_allclose(together, alone)


def test_knn_temperature_votes_weigh_close_neighbours_more():
    X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]], dtype=np.float32)
    y = np.array([0, 0, 1, 1, 1])
    q = np.array([[0.97, 0.03]], dtype=np.float32)
    assert KNNClassifier(n_neighbors=5, device="cpu").fit(X, y).predict(q)[0] == 1  # 3 votes against 2
    assert KNNClassifier(n_neighbors=5, weights="temperature", device="cpu").fit(X, y).predict(q)[0] == 0


def test_sweep_json_has_the_whole_curve_with_iterations_and_notes_grid_edges(tmp_path, capsys):
    from featx.store import journal_path  # noqa: F401  (the store module is imported by the CLI anyway)

    X, y = blobs(n_per_class=50, n_classes=3)
    store = tmp_path / "f.h5"
    _write_store(store, X, y)
    rc = main(["fit-head", str(store), "--head", "logreg", "--sweep", "--out", str(tmp_path / "h"), "--device", "cpu", "--json",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out.strip().splitlines()[-1])
    sweep_json = result["sweep"]
    assert len(sweep_json["curve"]) >= 15 and result["sweep_best"] == sweep_json["best"] and sweep_json["seconds"] > 0
    assert all("iterations" in c and c["converged"] for c in sweep_json["curve"])
    edges = grid_edges([{"C": c} for c in (0.01, 0.1, 1.0)], {"C": 0.01}, [0.9, 0.8, 0.7])
    assert edges == [{"param": "C", "value": 0.01, "side": "low", "next": pytest.approx(0.001)}]
    assert grid_edges([{"C": c} for c in (0.01, 0.1, 1.0)], {"C": 0.01}, [0.9, 0.9, 0.9]) == []  # a flat curve has no edge


def _write_store(path: Path, X: np.ndarray, y: np.ndarray, split: np.ndarray | None = None) -> None:
    """A feature store group written directly (what featx extract writes, minus the images)."""
    with h5py.File(path, "w") as f:
        g = f.create_group("m")
        g.create_dataset("features", data=X, chunks=(min(len(X), 256), X.shape[1]), maxshape=(None, X.shape[1]))
        g.create_dataset("labels", data=y.astype(np.int64))
        g.create_dataset("ids", data=[f"row{i}" for i in range(len(y))], dtype=h5py.string_dtype("utf-8"))
        g.create_dataset("split", data=np.zeros(len(y), np.int8) if split is None else split)
        g.create_dataset("index", data=np.arange(len(y)))
        s = g.create_group("skipped")
        for name in ("ids", "reasons"):
            s.create_dataset(name, data=np.array([], dtype=object), dtype=h5py.string_dtype("utf-8"))
        s.create_dataset("index", data=np.array([], dtype=np.int64))
        g.attrs.update({"model": "m", "weights_sha256": "0" * 64, "class_names": json.dumps([f"c{k}" for k in range(int(y.max()) + 1)]),
                        "split_names": json.dumps(["train", "test"]), "num_features": X.shape[1], "n_rows": len(y), "n_skipped": 0})


@pytest.mark.parametrize("head", ["logreg", "torch-linear", "mlp"])
def test_heads_stream_a_store_larger_than_the_memory_cap(tmp_path, head, monkeypatch, caplog):
    from featx.store import FeatureStore

    X, y = blobs(n_per_class=400, n_classes=3, dim=32, spread=3.0)
    store = tmp_path / "f.h5"
    _write_store(store, X, y)
    largest = []
    original = FeatureStore.features_of

    def spy(self, key, rows):
        largest.append(len(rows))
        return original(self, key, rows)

    monkeypatch.setattr(FeatureStore, "features_of", spy)
    params = {"max_epochs": 15} if head != "logreg" else {}
    cap_gb = 32e3 / 1e9  # 32 kB: a fifth of the 960 training rows x 32 features
    with caplog.at_level(logging.INFO):
        streamed = fit_head(store, FitHeadConfig(head=head, device="cpu", params=params, max_memory=cap_gb, progress=False,
                                                 sweep=head == "logreg"), tmp_path / "s")
    assert "streaming them in chunks" in caplog.text
    assert max(largest) * 32 * 4 <= cap_gb * 1e9 / 4 + 256 * 128  # never more than a chunk of rows read at once
    in_memory = fit_head(store, FitHeadConfig(head=head, device="cpu", params=params, progress=False, sweep=head == "logreg"),
                         tmp_path / "m")
    assert streamed.metrics["accuracy"] >= in_memory.metrics["accuracy"] - 0.03 and streamed.metrics["accuracy"] > 0.8


def test_a_head_that_needs_memory_is_refused_with_the_fix(tmp_path, capsys):
    X, y = blobs(n_per_class=100, n_classes=3)
    _write_store(tmp_path / "f.h5", X, y)
    rc = main(["fit-head", str(tmp_path / "f.h5"), "--head", "knn", "--out", str(tmp_path / "h"), "--max-memory", "0.000001"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs its" in err and "use a head that streams (logreg, torch-linear, mlp)" in err
    assert not (tmp_path / "h").exists()


def test_bad_grid_values_are_one_line_errors(tmp_path, capsys):
    X, y = blobs(n_per_class=30, n_classes=3)
    _write_store(tmp_path / "f.h5", X, y)
    for grid, fragment in (("C=0.1,-1", "C=-1 is not positive"), ("gamma=1,2", "has no parameter gamma"), ("C=a,b", "not a number")):
        rc = main(["fit-head", str(tmp_path / "f.h5"), "--head", "logreg", "--sweep", "--grid", grid, "--out", str(tmp_path / "h")])
        err = capsys.readouterr().err
        assert rc == 2 and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "h").exists()
    rc = main(["fit-head", str(tmp_path / "f.h5"), "--head", "logreg", "--sweep", "--grid", "C=0.01,0.1,1", "--out", str(tmp_path / "h"),
               "--json", "--no-progress"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and [c["params"]["C"] for c in result["sweep"]["curve"]] == [0.01, 0.1, 1.0]


def test_a_flat_validation_curve_does_not_choose_the_strongest_regularisation():
    """Easy classes: every C scores 1.0 on validation. The first C (1e-5) can refit into a head that predicts one class
    (seen in the README session with 8 images a class, accuracy 0.2); ties go to the middle of the plateau."""
    from featx.heads import grid_of, make_head, sweep

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    X = rng.normal(0, 10, (3, 32))[y] + rng.normal(0, 0.1, (len(y), 32))
    grid = grid_of("logreg")
    pipe, result = sweep(make_head("logreg", device="cpu"), X, y, grid, random_state=0)
    assert {c["val_accuracy"] for c in result.curve} == {1.0}
    assert result.best == grid[len(grid) // 2]
    assert (pipe.predict(X) == y).mean() == 1.0
