"""Heads as estimators: accuracy on synthetic and real embeddings, estimator checks, batched sweep, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.utils.estimator_checks import parametrize_with_checks

from featx.errors import FeatxError
from featx.statistics import mcnemar_exact
from featx.head_folder import load_head, save_head
from featx.heads import HEADS, MLPClassifier, TorchLinearClassifier, grid_of, make_head, predict_scores, sweep, train_linear_heads
from featx.store import FeatureStore

FAST = {"torch-linear": {"max_epochs": 40}, "mlp": {"max_epochs": 40, "hidden_dim": 64}}


pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n_per_class=100, n_classes=4, dim=32, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (n_classes, dim))
    X = np.concatenate([c + rng.normal(0, spread, (n_per_class, dim)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(n_classes), n_per_class)
    return X, y


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory):
    """scikit-learn digits through a random-init tiny timm model (32 px), extracted once."""
    from featx import ExtractConfig, extract

    out = tmp_path_factory.mktemp("digits") / "digits.h5"
    extract("digits", ExtractConfig(model="test_resnet", weights="random", img_size=32, workers=0, batch_size=256, progress=False), out)
    return out


@pytest.mark.parametrize("name", list(HEADS))
def test_head_beats_chance_on_separable_embeddings(name):
    X, y = blobs()
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    pipe = make_head(name, device="cpu", params=FAST.get(name)).fit(Xtr, ytr)
    assert pipe.score(Xte, yte) > 0.9  # chance: 0.25
    p = predict_scores(pipe, Xte)
    assert p.shape == (len(Xte), 4) and np.allclose(p.sum(1), 1)


@pytest.mark.parametrize("name", list(HEADS))
def test_head_beats_chance_on_digits_embeddings(name, digits_store):
    fs = FeatureStore(digits_store).read()
    Xtr, Xte, ytr, yte = train_test_split(fs.X, fs.y, test_size=0.25, random_state=0, stratify=fs.y)
    acc = make_head(name, device="cpu", params=FAST.get(name)).fit(Xtr, ytr).score(Xte, yte)
    assert acc > 0.5, f"{name}: {acc:.3f}"  # chance: 0.1


@parametrize_with_checks([
    TorchLinearClassifier(max_epochs=20, lr=0.05, device="cpu"),
    MLPClassifier(max_epochs=20, hidden_dim=16, lr=0.05, device="cpu"),
])
def test_torch_heads_are_sklearn_estimators(estimator, check):
    check(estimator)


def test_torch_head_in_grid_search_and_cross_val():
    X, y = blobs(n_per_class=40, n_classes=3, dim=8)
    scores = cross_val_score(make_head("torch-linear", device="cpu", params={"max_epochs": 20}), X, y, cv=3)
    assert scores.mean() > 0.9
    # a learning rate too small to train in 10 epochs (the random start scores what it scores), listed first so that a grid
    # whose values were ignored (every candidate the same model, a tie) would choose it
    gs = GridSearchCV(make_head("mlp", device="cpu", params={"max_epochs": 10, "hidden_dim": 16}),
                      {"head__lr": [1e-7, 1e-2]}, cv=2).fit(X, y)
    tiny, good = gs.cv_results_["mean_test_score"]
    assert gs.best_params_["head__lr"] == 1e-2 and tiny < good, gs.cv_results_["mean_test_score"]
    assert gs.score(X, y) > 0.9


def test_batched_sweep_equals_heads_trained_one_by_one():
    X, y = blobs(n_per_class=60, n_classes=3, dim=16, spread=4.0, seed=1)  # overlapping: the grid values differ
    tr, va = train_test_split(np.arange(len(y)), test_size=0.3, random_state=0, stratify=y)  # as sweep() carves it
    Xtr, ytr, Xva, yva = X[np.sort(tr)], y[np.sort(tr)], X[np.sort(va)], y[np.sort(va)]
    base = TorchLinearClassifier(max_epochs=15, batch_size=32, device="cpu")
    grid = grid_of("torch-linear", {"lr": (1e-3, 3e-2), "weight_decay": (0.0, 1e-2, 3.0)})
    batched = base.fit_grid(Xtr, ytr, grid)
    singles = [clone(base).set_params(**g).fit(Xtr, ytr) for g in grid]
    for b, s in zip(batched, singles):
        np.testing.assert_allclose(b.coef_, s.coef_, rtol=1e-4, atol=1e-5)
        assert b.n_epochs_ == s.n_epochs_
    acc_b = [m.score(Xva, yva) for m in batched]
    acc_s = [m.score(Xva, yva) for m in singles]
    assert acc_b == acc_s and len(set(acc_s)) > 1  # the grid matters, and both ways agree on every value
    # sweep() carves the same split itself and must pick the one-by-one winner
    pipe, result = sweep(make_head("torch-linear", standardize=False, device="cpu", params={"max_epochs": 15, "batch_size": 32}),
                         X, y, grid, val_fraction=0.3, random_state=0)
    assert result.batched and [c["val_accuracy"] for c in result.curve] == acc_s
    correct = [m.predict(Xva) == yva for m in singles]
    top = np.flatnonzero(np.asarray(acc_s) == max(acc_s))
    ref = correct[int(top[len(top) // 2])]
    tied = [i for i, c in enumerate(correct) if acc_s[i] == max(acc_s) or mcnemar_exact(ref, c) >= 0.05]
    assert result.best == grid[tied[len(tied) // 2]]  # ties (indistinguishable on validation): the middle one
    assert pipe.named_steps["head"].get_params()["lr"] == result.best["lr"]


def test_linear_heads_stop_independently():
    X, y = blobs(n_per_class=50, n_classes=3, dim=8, spread=4.0)
    heads = train_linear_heads(X, y, 3, lrs=[1e-4, 1e-1], weight_decays=[0.0, 0.0], max_epochs=60, patience=3,
                               validation_fraction=0.2, device="cpu")
    assert heads.weight.shape == (2, 8, 3)
    assert heads.epochs[1] < heads.epochs[0] <= 60  # the fast head converges and stops first
    assert heads.val_accuracy[1] > 0.8


def test_sklearn_sweep_records_curve_and_refits():
    X, y = blobs(n_per_class=50, n_classes=3, dim=8, spread=3.0)
    pipe, result = sweep(make_head("knn"), X, y, grid_of("knn"), val_fraction=0.25)
    assert [c["params"]["n_neighbors"] for c in result.curve] == list(HEADS["knn"].grid["n_neighbors"])
    assert pipe.named_steps["head"].n_neighbors == result.best["n_neighbors"]
    assert len(pipe.named_steps["head"].fit_X_) == len(X)  # refit on every training row


@pytest.mark.parametrize("name,kw", [("logreg", {}), ("torch-linear", {"pca": 5, "l2_normalize": True}), ("mlp", {"pca": 6})])
def test_save_load_round_trip(tmp_path, name, kw):
    X, y = blobs(n_per_class=30, n_classes=3, dim=12)
    pipe = make_head(name, device="cpu", params=FAST.get(name), **kw).fit(X, y)
    meta = {"format": "featx-head/1", "head": name, "estimator": type(pipe[-1]).__name__, "params": pipe[-1].get_params(),
            "class_names": ["a", "b", "c"], "feature_dim": 12, "model_key": "m", "backbone": {"model": "m"}, "request": {"x": 1}}
    save_head(tmp_path / "head", pipe, meta)
    loaded = load_head(tmp_path / "head")
    np.testing.assert_allclose(predict_scores(loaded.pipeline, X), predict_scores(pipe, X), rtol=1e-6, atol=1e-9)
    assert (loaded.pipeline.predict(X) == pipe.predict(X)).all()
    if name != "logreg":
        assert not (tmp_path / "head" / "head.joblib").exists() and (tmp_path / "head" / "head.pt").exists()
        torch.load(tmp_path / "head" / "head.pt", weights_only=True)  # plain tensors only


def test_loaded_head_rejects_features_of_another_backbone(tmp_path):
    X, y = blobs(n_per_class=10, n_classes=2, dim=4)
    pipe = make_head("ridge").fit(X, y)
    meta = {"format": "featx-head/1", "head": "ridge", "estimator": "RidgeClassifier", "params": {}, "class_names": ["a", "b"],
            "feature_dim": 4, "model_key": "resnet", "backbone": {"model": "resnet", "weights_sha256": "aa" * 32}, "request": {}}
    save_head(tmp_path / "h", pipe, meta)
    head = load_head(tmp_path / "h")
    head.check_features({"model": "resnet", "weights_sha256": "aa" * 32}, "resnet", 4, "store")
    with pytest.raises(FeatxError, match=r"weights bbbb.*dimension 8 vs the head's 4"):
        head.check_features({"model": "resnet", "weights_sha256": "bb" * 32}, "resnet", 8, "store")
    with pytest.raises(FeatxError, match="model 'vit' vs the head's 'resnet'"):
        head.check_features({"model": "vit", "weights_sha256": "aa" * 32}, "vit", 4, "store")


def test_unknown_head_and_parameter_are_user_errors():
    with pytest.raises(FeatxError, match="unknown head 'svm'; choose one of: logreg"):
        make_head("svm")
    with pytest.raises(FeatxError, match="has no parameter gamma"):
        make_head("logreg", params={"gamma": 1})


def test_auto_early_stopping_only_on_large_training_sets():
    from featx.heads import AUTO_EARLY_STOPPING_ROWS, early_stopping_split

    small = np.repeat(np.arange(4), 500)
    tr, va = early_stopping_split(small, "auto", 0)
    assert va is None and len(tr) == len(small)  # whole cosine schedule on small sets
    large = np.repeat(np.arange(4), AUTO_EARLY_STOPPING_ROWS // 4)
    tr, va = early_stopping_split(large, "auto", 0)
    assert len(va) == AUTO_EARLY_STOPPING_ROWS // 10 and len(np.intersect1d(tr, va)) == 0
    with pytest.raises(ValueError, match="validation_fraction"):
        TorchLinearClassifier(validation_fraction="sometimes", device="cpu").fit(small[:, None].astype(np.float32), small)


def test_knn_class_weight_multiplies_every_neighbours_vote():
    from featx.heads import KNNClassifier

    X, y = np.array([[0.0], [0.1], [0.2], [0.3]]), np.array([0, 0, 0, 1])  # three neighbours of class 0, one of class 1
    query = np.array([[0.15]])
    plain = KNNClassifier(n_neighbors=4, metric="euclidean", device="cpu").fit(X, y)
    weighted = KNNClassifier(n_neighbors=4, metric="euclidean", class_weight={1: 5.0}, device="cpu").fit(X, y)
    np.testing.assert_allclose(plain.predict_proba(query), [[3 / 4, 1 / 4]])
    np.testing.assert_allclose(weighted.predict_proba(query), [[3 / 8, 5 / 8]])  # 3 x 1 against 1 x 5
    assert plain.predict(query)[0] == 0 and weighted.predict(query)[0] == 1


def test_ncm_on_one_image_per_class_scores_by_its_prediction():
    # no spread within a class: scikit-learn's predict_proba fails on NaN; the scores become the prediction, one-hot
    from featx.heads import full_scores

    X = np.random.default_rng(0).normal(size=(3, 8))
    head = make_head("ncm").fit(X, [0, 1, 2])
    scores = full_scores(head, X + 0.01, 4)
    np.testing.assert_array_equal(scores, np.eye(4)[[0, 1, 2]][:, :4])
