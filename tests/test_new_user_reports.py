"""What a new user met on a fresh clone (issue 'Tried as a new user would'): each report reproduced, then fixed."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import warnings

import h5py
import numpy as np
import pytest
import timm
import torch

from conftest import make_image_folder, write_image
from featx.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--img-size", "32", "--workers", "0", "--no-progress"]


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, command, *fragments):
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"featx {command}: error: "), err
    for f in fragments:
        assert f in last, last
    return last


@pytest.fixture
def store(tmp_path, split_folder, capsys):
    """split_folder (train 3 x 6, test 3 x 3) through a saved random test_resnet checkpoint."""
    torch.manual_seed(1)
    ckpt = tmp_path / "backbone.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), ckpt)
    out = tmp_path / "f.h5"
    assert run(capsys, "extract", split_folder, "--model", "test_resnet", "--weights", ckpt, "--out", out, *FAST)[0] == 0
    return out


# -- 1. a store where every image was skipped ---------------------------------------------------
def test_csv_with_paths_relative_to_the_working_directory_is_refused_at_once(tmp_path, monkeypatch, capsys):
    make_image_folder(tmp_path / "images", per_class=2)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "m.csv").write_text("path,label\nimages/class0/000.png,a\nimages/class1/000.png,b\n")
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, "extract", "lists/m.csv", "--model", "test_resnet", "--weights", "random", "--out", "f.h5", *FAST)
    one_line_error(rc, err, "extract", "relative to its folder", "write them relative to the CSV, or absolute")
    assert not (tmp_path / "f.h5").exists()


def test_extract_fails_when_no_image_can_be_read_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("path,label\ngone/a.png,a\ngone/b.png,b\n")
    rc, _, err = run(capsys, "extract", tmp_path / "m.csv", "--model", "test_resnet", "--weights", "random", "--out", tmp_path / "f.h5", *FAST)
    one_line_error(rc, err, "extract", "none of the 2 images", "file not found", "relative to the CSV's folder", "nothing was written")
    assert not (tmp_path / "f.h5").exists() and not list(tmp_path.glob("f.h5*"))


def test_extract_warns_loudly_when_many_images_are_skipped(tmp_path, capsys, caplog):
    imgs = make_image_folder(tmp_path / "images", per_class=3)
    (imgs / "class0" / "zz.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert run(capsys, "extract", imgs, "--model", "test_resnet", "--weights", "random", "--out", tmp_path / "f.h5", *FAST)[0] == 0
    assert "1 of 10 images (10%) could not be read" in caplog.text


def test_fit_head_and_evaluate_on_a_group_without_rows_say_why(store, tmp_path, capsys):
    empty = tmp_path / "empty.h5"
    shutil.copy(store, empty)
    with h5py.File(empty, "r+") as f:
        g = f["test_resnet"]
        for name in ("features", "labels", "ids", "split", "index"):
            g[name].resize(0, axis=0)
    rc, _, err = run(capsys, "fit-head", empty, "--head", "ridge", "--out", tmp_path / "h")
    one_line_error(rc, err, "fit-head", "holds no rows")
    assert run(capsys, "fit-head", store, "--head", "ridge", "--out", tmp_path / "h")[0] == 0
    rc, _, err = run(capsys, "evaluate", tmp_path / "h", empty, "--split", "testing")
    one_line_error(rc, err, "evaluate", "holds no rows")


# -- 2. a relative --weights path ---------------------------------------------------------------
def test_relative_weights_are_recorded_absolute_so_predict_works_from_elsewhere(tmp_path, monkeypatch, capsys):
    work = tmp_path / "err"
    imgs = make_image_folder(work / "images", per_class=4)
    torch.manual_seed(3)
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), work / "moved.pth")
    monkeypatch.chdir(work)
    assert run(capsys, "extract", "images", "--model", "test_resnet", "--weights", "moved.pth", "--out", "f.h5", *FAST)[0] == 0
    assert run(capsys, "fit-head", "f.h5", "--head", "logreg", "--out", "HEAD")[0] == 0
    with h5py.File(work / "f.h5") as f:
        assert f["test_resnet"].attrs["weights"] == str(work / "moved.pth")
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, "predict", "err/HEAD", "err/images", "--out", "p.csv", "--workers", "0", "--no-progress")
    assert rc == 0, err
    assert len(list(csv.DictReader(open(tmp_path / "p.csv")))) == 12 and imgs.is_dir()


# -- 3./4. predict on flat folders, path-only CSVs and subsets of the classes --------------------
def test_predict_reads_a_flat_folder_and_a_path_only_csv(store, tmp_path, capsys):
    assert run(capsys, "fit-head", store, "--head", "logreg", "--out", tmp_path / "head")[0] == 0
    photos = tmp_path / "new_photos"
    for i in range(4):
        write_image(photos / f"img{i}.jpg", (200, 60, 210), seed=i)
    rc, out, err = run(capsys, "predict", tmp_path / "head", photos, "--out", tmp_path / "p.csv", "--workers", "0", "--no-progress")
    assert rc == 0, err
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 4 and all(r["label"] for r in rows) and "true_label" not in rows[0]
    (tmp_path / "only_paths.csv").write_text("path\nnew_photos/img0.jpg\nnew_photos/img1.jpg\n")
    rc, out, err = run(capsys, "predict", tmp_path / "head", tmp_path / "only_paths.csv", "--out", tmp_path / "q.csv", "--workers", "0")
    assert rc == 0, err
    assert [r["path"].endswith("img0.jpg") for r in csv.DictReader(open(tmp_path / "q.csv"))] == [True, False]


def test_true_label_and_accuracy_stay_when_the_folder_holds_some_of_the_classes(store, tmp_path, capsys):
    assert run(capsys, "fit-head", store, "--head", "logreg", "--out", tmp_path / "head")[0] == 0
    some = make_image_folder(tmp_path / "some", n_classes=2, per_class=3, seed=700)  # class0, class1 of the head's three
    rc, out, err = run(capsys, "predict", tmp_path / "head", some, "--out", tmp_path / "p.csv", "--workers", "0", "--no-progress")
    assert rc == 0, err
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["true_label"] for r in rows] == ["class0"] * 3 + ["class1"] * 3
    assert "accuracy on the source's labels" in out


def test_predict_top_k_split_column_and_accuracy_per_split(tmp_path, capsys):
    root = make_image_folder(tmp_path / "imgs", n_classes=6, per_class=4, splits=("train",))
    make_image_folder(root, n_classes=6, per_class=2, splits=("test",), seed=900)
    assert run(capsys, "extract", root, "--model", "test_resnet", "--weights", "random", "--out", tmp_path / "f.h5", *FAST)[0] == 0
    assert run(capsys, "fit-head", tmp_path / "f.h5", "--head", "logreg", "--out", tmp_path / "head")[0] == 0
    rc, out, err = run(capsys, "predict", tmp_path / "head", root, "--out", tmp_path / "p.csv", "--workers", "0", "--no-progress")
    assert rc == 0, err
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert {"label_5", "probability_5", "split", "true_label"} <= set(rows[0]) and "label_6" not in rows[0]
    probs = [float(rows[0]["probability"])] + [float(rows[0][f"probability_{r}"]) for r in range(2, 6)]
    assert probs == sorted(probs, reverse=True) and len({rows[0]["label"], *(rows[0][f"label_{r}"] for r in range(2, 6))}) == 5
    assert {r["split"] for r in rows} == {"train", "test"} and "by split: test" in out and "train" in out
    assert run(capsys, "predict", tmp_path / "head", root, "--out", tmp_path / "q.csv", "--top-k", "1", "--workers", "0")[0] == 0
    assert "label_2" not in next(csv.DictReader(open(tmp_path / "q.csv")))


# -- 5. labelled train, unlabelled test ---------------------------------------------------------
def test_unlabelled_test_split_is_skipped_and_the_training_split_can_be_held_out_explicitly(split_folder, tmp_path, capsys):
    lines = ["path,label,split"]
    for p in sorted(split_folder.rglob("*.png")):
        rel = p.relative_to(split_folder)
        split, cls = rel.parts[0], rel.parts[1]
        lines.append(f"{rel},{cls if split == 'train' else ''},{split}")
    (split_folder / "m.csv").write_text("\n".join(lines) + "\n")
    assert run(capsys, "extract", split_folder / "m.csv", "--model", "test_resnet", "--weights", "random", "--out", tmp_path / "f.h5",
               *FAST)[0] == 0
    rc, out, err = run(capsys, "fit-head", tmp_path / "f.h5", "--head", "logreg", "--out", tmp_path / "h", "--json")
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["test_split"] is None and "hold-out of 'train'" in result["test_split_description"]
    labelled = tmp_path / "labelled.h5"
    assert run(capsys, "extract", split_folder, "--model", "test_resnet", "--weights", "random", "--out", labelled, *FAST)[0] == 0
    rc, out, err = run(capsys, "fit-head", labelled, "--head", "logreg", "--out", tmp_path / "h2", "--test-split", "train", "--json")
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["test_split"] is None and result["n_train"] + result["n_test"] == 18  # the test split is left alone


# -- 6. --sweep with nothing to sweep --------------------------------------------------------------
@pytest.mark.parametrize("extra", [["--head", "ncm"], ["--head", "logreg", "--param", "C=0.1"]])
def test_sweep_with_nothing_to_sweep_says_so(store, tmp_path, capsys, extra):
    rc, out, err = run(capsys, "fit-head", store, *extra, "--sweep", "--out", tmp_path / "h")
    assert rc == 0, err
    assert "Nothing to sweep" in out and "nan" not in out and "chose" not in out


def test_sweep_sweeps_what_is_left_after_fixed_parameters(store, tmp_path, capsys):
    rc, out, err = run(capsys, "fit-head", store, "--head", "torch-linear", "--sweep", "--param", "lr=0.01", "--param", "max_epochs=5",
                       "--device", "cpu", "--out", tmp_path / "h")
    assert rc == 0, err
    sweep = json.loads((tmp_path / "h" / "head.json").read_text())["sweep"]
    assert sweep["params"] == ["weight_decay"] and all(c["params"].keys() == {"weight_decay"} for c in sweep["curve"])


# -- 7. evaluations of other stores never overwrite each other ---------------------------------------
def test_evaluations_of_different_stores_do_not_collide(store, tmp_path, capsys):
    assert run(capsys, "fit-head", store, "--head", "ridge", "--out", tmp_path / "h")[0] == 0
    assert run(capsys, "evaluate", tmp_path / "h", store, "--split", "train")[0] == 0
    other = tmp_path / "other.h5"
    shutil.copy(store, other)
    assert run(capsys, "evaluate", tmp_path / "h", other, "--split", "train")[0] == 0
    names = sorted(p.name for p in (tmp_path / "h").glob("evaluation-*.json"))
    assert names == ["evaluation-other-test_resnet-train.json", "evaluation-train.json"]
    assert json.loads((tmp_path / "h" / "evaluation-train.json").read_text())["features"] == str(store.resolve())
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(store, moved / "other.h5")  # same file name, another store
    rc, _, err = run(capsys, "evaluate", tmp_path / "h", moved / "other.h5", "--split", "train")
    one_line_error(rc, err, "evaluate", "holds an evaluation of other features", "--overwrite")
    assert run(capsys, "evaluate", tmp_path / "h", moved / "other.h5", "--split", "train", "--overwrite")[0] == 0


# -- 8. the demo never suggests options it does not take -------------------------------------------
def test_demo_replaces_what_it_made_earlier_instead_of_refusing(tmp_path, lite0_weights):
    from featx.configs import DemoConfig
    from featx.demo import run_demo

    a = make_image_folder(tmp_path / "a", per_class=4)
    b = make_image_folder(tmp_path / "b", per_class=5, seed=300)
    first = run_demo(DemoConfig(out_dir=str(tmp_path / "demo"), source=str(a), head="ncm", progress=False))
    second = run_demo(DemoConfig(out_dir=str(tmp_path / "demo"), source=str(b), head="ncm", progress=False))
    assert first.extract.n_rows == 12 and second.extract.n_rows == 15 and not second.extract.cache_hit


# -- 9. JSON holds values -------------------------------------------------------------------------------
def test_json_fields_hold_values_and_prose_goes_to_description_fields(store, tmp_path, capsys):
    rc, out, _ = run(capsys, "fit-head", store, "--head", "ridge", "--out", tmp_path / "h", "--json")
    fit = json.loads(out.strip().splitlines()[-1])
    assert fit["test_split"] == "test" and fit["train_split"] == "train" and fit["test_split_description"] == "split 'test'"
    rc, out, _ = run(capsys, "evaluate", tmp_path / "h", store, "--split", "train", "--json")
    ev = json.loads(out.strip().splitlines()[-1])
    assert ev["split"] == "train" and ev["holdout"] is False and ev["split_description"] == "split 'train'"


# -- 10. library warnings in featx's words, once ---------------------------------------------------------
def test_library_warnings_are_said_once_in_featx_words(caplog):
    from scipy.linalg import LinAlgWarning

    from featx.cli._warnings import library_warnings_said_once

    with caplog.at_level(logging.WARNING), library_warnings_said_once():
        for _ in range(3):
            warnings.warn("Ill-conditioned matrix (rcond=1e-20): result may not be accurate.", LinAlgWarning)
        warnings.warn("something new", RuntimeWarning)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 2 and "ill-conditioned" in notes[0] and "(3 times)" in notes[0] and "rcond" not in notes[0]
    assert "RuntimeWarning" in notes[1] and "something new" in notes[1]


def test_metrics_with_predicted_classes_absent_from_the_truth_raise_no_warning():
    from featx.metrics import classification_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(np.array([0, 0, 1]), np.array([0, 2, 1]), n_classes=3)
    assert m["balanced_accuracy"] == pytest.approx(0.75)


# -- honest data --------------------------------------------------------------------------------------------
def test_classes_on_one_side_only_are_named_before_fitting(tmp_path, capsys, caplog):
    root = make_image_folder(tmp_path / "imgs", n_classes=3, per_class=4, splits=("train",))
    make_image_folder(root, n_classes=3, per_class=2, splits=("test",), seed=400)
    shutil.rmtree(root / "train" / "class2")
    shutil.rmtree(root / "test" / "class1")
    assert run(capsys, "extract", root, "--model", "test_resnet", "--weights", "random", "--out", tmp_path / "f.h5", *FAST)[0] == 0
    with caplog.at_level(logging.WARNING):
        assert run(capsys, "fit-head", tmp_path / "f.h5", "--head", "ncm", "--out", tmp_path / "h")[0] == 0
    assert "only in the test rows, which the head can never predict: class2" in caplog.text
    assert "no test rows (their accuracy is not measured): class1" in caplog.text


def test_odd_csv_rows_split_names_and_empty_class_folders_are_counted(tmp_path, caplog):
    from featx.sources import resolve_source

    root = make_image_folder(tmp_path / "imgs", per_class=2)
    (root / "class9").mkdir()
    (tmp_path / "m.csv").write_text("path,label,split\nimgs/class0/000.png,a,train\nimgs/class0/001.png,,train\n"
                                    ",b,train\nimgs/class1/000.png,b,tset,extra\n")
    with caplog.at_level(logging.WARNING):
        src = resolve_source(tmp_path / "m.csv")
        folder = resolve_source(root)
    assert len(src) == 3 and folder.class_names == ["class0", "class1", "class2"]
    text = caplog.text
    assert "1 rows of" in text and "more values than the header" in text and "empty path" in text and "no label" in text
    assert "split 'tset'" in text and "did you mean 'test'" in text
    assert "1 class folders" in text and "class9" in text


# -- frictions ------------------------------------------------------------------------------------------------
def test_pretrained_without_network_fails_at_once_in_one_line(tmp_path, capsys, monkeypatch):
    import socket

    import featx.backbones as backbones

    def unreachable(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(backbones, "_pretrained_cached", lambda name: False)
    imgs = make_image_folder(tmp_path / "imgs", per_class=2)
    rc, _, err = run(capsys, "extract", imgs, "--model", "test_resnet", "--pretrained", "--out", tmp_path / "f.h5", *FAST)
    one_line_error(rc, err, "extract", "cannot be reached", "--weights PATH")
    assert len(err.strip().splitlines()) == 1


def test_position_mapping_notice_is_recorded_not_printed(tmp_path, capsys, caplog, lite0_weights):
    imgs = make_image_folder(tmp_path / "imgs", per_class=2)
    with caplog.at_level(logging.INFO):
        assert run(capsys, "extract", imgs, "--model", "tf_efficientnet_lite0", "--weights", lite0_weights, "--img-size", "64",
                   "--out", tmp_path / "f.h5", "--workers", "0", "--no-progress")[0] == 0
    assert "by position" not in caplog.text
    with h5py.File(tmp_path / "f.h5") as f:
        assert "by position" in f["tf_efficientnet_lite0"].attrs["weights_load"]


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("training epochs (default:", "images per batch (default: 32)", "AdamW weight decay (not on biases and norms) (default:"):
        assert fragment in text, fragment
