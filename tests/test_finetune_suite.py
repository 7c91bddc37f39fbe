"""The fine-tuning robustness suite (benchmarks/finetune_vs_heads.py): what is reported never chose anything."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from featx.finetuning import FinetuneConfig
from featx.finetuning._data import choose_images
from featx.sources import ImageSource

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _suite  # noqa: E402


def _cifar_like(per_class_train: int = 5000, per_class_test: int = 1000, n_classes: int = 10):
    labels = np.r_[np.repeat(np.arange(n_classes), per_class_train), np.repeat(np.arange(n_classes), per_class_test)]
    splits = np.array(["train"] * (n_classes * per_class_train) + ["test"] * (n_classes * per_class_test))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"][:n_classes]
    return labels, splits, names


def _source(labels, splits, names) -> ImageSource:
    return ImageSource(name="fake", ids=[f"{s}/{i}.png" for i, s in enumerate(splits)], labels=labels, splits=list(splits),
                       class_names=list(names))


@pytest.mark.parametrize("regime", _suite.REGIMES, ids=lambda r: r.name)
def test_no_report_test_image_is_in_a_training_validation_or_search_part(regime):
    if regime.dataset == "digits":
        from sklearn.datasets import load_digits

        labels = load_digits().target
        splits, names = np.array(["train"] * len(labels)), [str(c) for c in range(10)]
        excluded = None
    else:
        labels, splits, names = _cifar_like(per_class_train=6000 if regime.dataset == "fashion-mnist" else 5000)
        excluded = np.flatnonzero(splits == "test")[::7]  # images an earlier search looked at
    parts = _suite.build_parts(labels, splits, names, regime, exclude_from_report=excluded)
    report_test = set(parts["report_test"].tolist())
    for other in ("report_train", "search_train", "search_test"):
        assert not report_test & set(parts[other].tolist()), other
    assert not set(parts["search_test"].tolist()) & (set(parts["report_train"].tolist()) | set(parts["search_train"].tolist()))
    assert not set(parts["report_train"].tolist()) & set(parts["search_train"].tolist())
    if excluded is not None:
        assert not report_test & set(excluded.tolist())
    n_classes = len(regime.classes) if regime.classes else 10
    assert len(parts["report_train"]) == len(parts["search_train"]) == regime.train_per_class * n_classes
    assert len(parts["report_test"]) == regime.test_per_class * n_classes
    assert len(parts["search_test"]) == regime.search_test_per_class * n_classes

    # the run carves its validation images from its training part only: never from the report-test part
    full = _source(labels, splits, names)
    src = _suite.regime_source(full, parts, "report", regime)
    images = choose_images(src, FinetuneConfig(model="m", seed=2))
    ids = np.asarray(src.ids)
    validation_and_training = set(ids[images.val]) | set(ids[images.train])
    assert not validation_and_training & {full.ids[i] for i in report_test}
    assert set(ids[images.test]) == {full.ids[i] for i in report_test}
    assert sorted(set(src.class_names)) == sorted(regime.classes or names) and src.labels.max() == n_classes - 1


@pytest.mark.parametrize("regime", _suite.REGIMES, ids=lambda r: r.name)
def test_a_later_report_round_tests_on_images_no_earlier_round_tested_on_and_keeps_the_search_parts(regime):
    if regime.dataset == "digits":
        from sklearn.datasets import load_digits

        labels = load_digits().target
        splits, names, excluded = np.array(["train"] * len(labels)), [str(c) for c in range(10)], None
    else:
        labels, splits, names = _cifar_like(per_class_train=6000 if regime.dataset == "fashion-mnist" else 5000)
        excluded = np.flatnonzero(splits == "test")[::7]
    rounds = [_suite.build_parts(labels, splits, names, regime, exclude_from_report=excluded, report_round=r) for r in (1, 2)]
    first, second = rounds
    assert all(np.array_equal(first[k], second[k]) for k in ("search_train", "search_test"))
    assert not set(second["report_test"].tolist()) & set(first["report_test"].tolist())
    for a in _suite.PARTS:
        for b in _suite.PARTS:
            assert a == b or not set(second[a].tolist()) & set(second[b].tolist()), (a, b)
    if excluded is not None:
        assert not set(second["report_test"].tolist()) & set(excluded.tolist())
        assert not set(second["report_train"].tolist()) & set(first["report_train"].tolist())  # fresh training images too
    n_classes = len(regime.classes) if regime.classes else 10
    assert len(second["report_train"]) == regime.train_per_class * n_classes
    assert len(second["report_test"]) >= regime.test_per_class * n_classes * 0.98
    assert np.array_equal(_suite.build_parts(labels, splits, names, regime, exclude_from_report=excluded, report_round=2)["report_test"],
                          second["report_test"])


def test_a_report_round_without_enough_unused_images_is_refused_in_one_line_before_any_run(capsys, tmp_path, monkeypatch):
    import finetune_vs_heads as bench

    monkeypatch.setattr(bench, "WORK", tmp_path / "work")
    monkeypatch.setattr(bench, "run_regime", lambda *a: pytest.fail("a regime ran"))
    for round_, message in (("3", "digits: class 0 has too few unused images for report round 3"),
                            ("0", "--report-round must be 1 or more, not 0")):
        with pytest.raises(SystemExit) as e:
            bench.main(["--report", "--regimes", "digits", "--report-round", round_, "--no-write"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.strip().splitlines()[-1].endswith(message) and "Traceback" not in err


def test_the_parts_are_the_same_on_every_call_and_differ_between_search_and_report():
    labels, splits, names = _cifar_like()
    regime = _suite.REGIMES[0]
    a = _suite.build_parts(labels, splits, names, regime)
    b = _suite.build_parts(labels, splits, names, regime)
    assert all(np.array_equal(a[k], b[k]) for k in _suite.PARTS)
    assert set(a["report_train"].tolist()).isdisjoint(a["search_train"].tolist())


def test_the_old_search_test_images_are_the_ones_its_subset_drew():
    """featx 0.1's recipe search drew its test images with a seeded permutation per split and class, train split first."""
    labels, splits, names = _cifar_like(per_class_train=20, per_class_test=30, n_classes=3)
    src = _source(labels, splits, names)
    picked = _suite.old_search_test_images(src, per_class=4, seed=0)
    rng = np.random.default_rng(0)
    expected = []
    for split in ("train", "test"):
        for c in range(3):
            perm = rng.permutation(np.flatnonzero((splits == split) & (labels == c)))
            expected += perm[:4].tolist() if split == "test" else []
    assert picked.tolist() == sorted(expected)


@pytest.mark.slow
def test_the_scaled_down_suite_runs_end_to_end(lite0_weights, tmp_path, monkeypatch):
    """The report mode on a few digits per class with the real Lite0 weights: every column of the table is filled."""
    import finetune_vs_heads as bench

    monkeypatch.setattr(bench, "WORK", tmp_path / "work")
    out = tmp_path / "out.txt"
    import contextlib

    with open(out, "w") as fh, contextlib.redirect_stdout(fh):
        assert bench.main(["--report", "--scaled-down", "--regimes", "digits", "--no-write", "--no-progress", "--workers", "0"]) == 0
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| digits |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "40 / 20 / 50"  # 6 per class, a third of each validates
    assert "(" in cells[2] and cells[6].startswith(("frozen probe", "epoch"))
    assert "only 1 of the suite's 10 regimes ran" in text
