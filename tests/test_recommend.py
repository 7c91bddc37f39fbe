"""compare's recommendation: chosen on validation alone, ties to the cheaper row; rows the test images cannot tell from it."""

from __future__ import annotations

import csv
import json
import shutil

import h5py
import numpy as np
import pytest

from featx import ExtractConfig, extract
from featx.cli import main
from featx.comparison._recommend import mark_test_ties, recommend, summary_line

pytestmark = pytest.mark.usefixtures("one_thread")


def _row(name, val, cost, n_val=1000):
    return {"backbone": "b", "head": name, "val_accuracy": val, "val_accuracy_ci": [val - 0.01, val + 0.01], "n_val": n_val,
            "cost_s_per_image": cost}


def test_best_on_validation_wins_and_ties_within_one_standard_error_go_to_the_cheaper_row():
    # best 0.90 on 1,000 validation images: one standard error is sqrt(0.9 * 0.1 / 1000) = 0.0095
    rows = [_row("expensive", 0.90, 1.0), _row("cheap-within-noise", 0.895, 0.1), _row("cheapest-but-worse", 0.88, 0.01)]
    assert recommend(rows) == 1
    rows[1]["val_accuracy"] = 0.885  # now 1.5 standard errors below the best: no longer tied
    assert recommend(rows) == 0
    assert recommend([_row("a", 0.5, 1.0, n_val=0)]) is None  # no validation score: nothing to recommend by


def test_rows_within_noise_of_the_recommended_one_are_all_tied_and_a_clearly_better_one_is_not():
    rng = np.random.default_rng(0)
    reference = rng.random(200) < 0.8
    close = [reference.copy() for _ in range(3)]
    for c, flips in zip(close, ([3, 40], [7], [10, 11, 12])):  # 1 to 3 images differ
        c[flips] = ~c[flips]
    far = reference.copy()
    far[np.flatnonzero(~reference)[:25]] = True  # right on 25 more images than the reference, wrong on none
    rows = [_row(f"r{i}", 0.9 - 0.01 * i, 1.0) for i in range(5)]
    mark_test_ties(rows, [reference, *close, far], recommended=0)
    assert [r["mark"] for r in rows] == ["recommended", "tied", "tied", "tied", ""]
    assert rows[4]["mcnemar_p"] == pytest.approx(2 * 0.5**25) and all(r["mcnemar_p"] >= 0.05 for r in rows[1:4])
    assert summary_line(rows, 0, 200).startswith("recommended: b + r0 (validation 0.900 ± 0.010 on 1000 images); 3 rows tied")
    rows.append(_row("no-predictions", 0.5, 1.0))
    mark_test_ties(rows, [reference, *close, far, "the run folder has no test_predictions.csv"], recommended=0)
    assert rows[5]["mark"] == "not tested" and "no test_predictions.csv" in rows[5]["note"]


@pytest.fixture(scope="module")
def split_store(tmp_path_factory):
    """Digits embeddings (tiny random backbone) with an explicit test split: the last 360 rows."""
    out = tmp_path_factory.mktemp("recommend") / "digits.h5"
    extract("digits", ExtractConfig(model="test_resnet", weights="random", img_size=32, workers=0, batch_size=256, progress=False), out)
    with h5py.File(out, "r+") as f:
        g = f["test_resnet"]
        g.attrs["split_names"] = json.dumps(["train", "test"])
        split = g["split"][:]
        split[-360:] = 1
        g["split"][:] = split
    return out


def _compare(store, out, capsys):
    assert main(["compare", str(store), "--heads", "logreg,ncm", "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    rows = {r["head"]: r for r in csv.DictReader(open(out / "leaderboard.csv"))}
    return rows, next(h for h, r in rows.items() if r["mark"] == "recommended")


def test_poisoned_test_labels_do_not_change_the_recommendation(split_store, tmp_path, capsys):
    rows, chosen = _compare(split_store, tmp_path / "clean", capsys)
    other = next(h for h in rows if h != chosen)
    # poison: the test labels become the other head's own predictions, so a choice by test accuracy would take it
    predicted = {r["id"]: r["predicted"] for r in csv.DictReader(open(tmp_path / "clean" / "heads" / "test_resnet" / other /
                                                                      "test_predictions.csv"))}
    poisoned = tmp_path / "poisoned.h5"
    shutil.copy(split_store, poisoned)
    with h5py.File(poisoned, "r+") as f:
        g = f["test_resnet"]
        names = json.loads(g.attrs["class_names"])
        ids, labels, split = g["ids"].asstr()[:], g["labels"][:], g["split"][:]
        for i in np.flatnonzero(split == 1):
            labels[i] = names.index(predicted[ids[i]])
        g["labels"][:] = labels
    again, chosen_again = _compare(poisoned, tmp_path / "poisoned", capsys)
    assert float(again[other]["accuracy"]) == 1.0 > float(again[chosen]["accuracy"])  # the poison took
    assert chosen_again == chosen
    assert again[chosen]["val_accuracy"] == rows[chosen]["val_accuracy"]
