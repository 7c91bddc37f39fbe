"""featx fit-head / evaluate / predict through the command line, bad inputs included."""

from __future__ import annotations

import csv
import json
import shutil

import h5py
import numpy as np
import pytest
import timm
import torch

from conftest import make_image_folder
from featx.cli import main
from featx import ExtractConfig, extract
from featx.heads import grid_of

REQUIRED = {"head", "model", "accuracy", "balanced_accuracy", "macro_f1", "n_train", "n_test", "fit_seconds"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_cli") / "digits.h5"
    extract("digits", ExtractConfig(model="test_resnet", weights="random", img_size=32, workers=0, batch_size=256, progress=False), out)
    return out


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, command, *fragments):
    assert rc == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"featx {command}: error: ")
    for f in fragments:
        assert f in last, last


def edited_copy(store, tmp_path, edit, name="edited.h5"):
    path = tmp_path / name
    shutil.copy(store, path)
    with h5py.File(path, "r+") as f:
        edit(f["test_resnet"])
    return path


def test_fit_head_json_and_evaluate(digits_store, tmp_path, capsys):
    rc, out, err = run(capsys, "fit-head", digits_store, "--head", "logreg", "--out", tmp_path / "h", "--json")
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert REQUIRED <= set(result) and result["head"] == "logreg" and result["model"] == "test_resnet"
    assert result["accuracy"] > 0.5 and result["n_train"] + result["n_test"] == 1797 and "top5_accuracy" in result
    assert "hold-out" in out  # one split: says it held out a test fraction
    sidecar = json.loads((tmp_path / "h" / "head.json").read_text())
    assert sidecar["backbone"]["model"] == "test_resnet" and sidecar["backbone"]["weights"] == "random"
    assert sidecar["feature_dim"] == 96 and len(sidecar["class_names"]) == 10 and sidecar["featx_version"]
    rc, out, err = run(capsys, "evaluate", tmp_path / "h", digits_store, "--json")
    assert rc == 0, err
    ev = json.loads(out.strip().splitlines()[-1])
    assert ev["accuracy"] == pytest.approx(result["accuracy"])  # the same seeded hold-out
    report = json.loads((tmp_path / "h" / "evaluation-train-holdout.json").read_text())
    assert np.asarray(report["confusion_matrix"]).sum() == result["n_test"] and len(report["per_class"]) == 10
    assert (tmp_path / "h" / "confusion-train-holdout.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_head_sweep_records_choice(digits_store, tmp_path, capsys):
    rc, out, err = run(capsys, "fit-head", digits_store, "--head", "torch-linear", "--sweep", "--out", tmp_path / "h",
                       "--param", "max_epochs=20", "--device", "cpu", "--json")
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    sweep = json.loads((tmp_path / "h" / "head.json").read_text())["sweep"]
    assert sweep["batched"] and result["sweep_best"] == sweep["best"] and len(sweep["curve"]) == len(grid_of("torch-linear"))
    assert result["accuracy"] > 0.5


@pytest.mark.parametrize("case", ["model", "train_split", "test_split", "single_class", "unlabeled", "nan"])
def test_fit_head_bad_input(case, digits_store, tmp_path, capsys):
    store, extra, fragments = digits_store, [], []
    if case == "model":
        extra, fragments = ["--model", "resnet50"], ["has no model 'resnet50'", "it holds: test_resnet"]
    elif case == "train_split":
        extra, fragments = ["--train-split", "training"], ["no split 'training'", "it has: train"]
    elif case == "test_split":
        extra, fragments = ["--test-split", "test"], ["no split 'test'"]
    elif case == "single_class":
        store = edited_copy(digits_store, tmp_path, lambda g: g["labels"].__setitem__(slice(None), 3))
        fragments = ["single class ('3')"]
    elif case == "unlabeled":
        store = edited_copy(digits_store, tmp_path, lambda g: g["labels"].__setitem__(slice(None), -1))
        fragments = ["has no labels"]
    elif case == "nan":
        store = edited_copy(digits_store, tmp_path, lambda g: g["features"].__setitem__(7, np.nan))
        fragments = ["1 feature rows", "NaN or infinite", "digits/7"]
    rc, out, err = run(capsys, "fit-head", store, "--head", "ridge", "--out", tmp_path / "h", *extra)
    assert_one_line_error(rc, err, "fit-head", *fragments)
    assert not (tmp_path / "h").exists()


def test_head_from_another_backbone_is_refused(digits_store, tmp_path, capsys):
    assert run(capsys, "fit-head", digits_store, "--head", "ncm", "--out", tmp_path / "h")[0] == 0
    other = edited_copy(digits_store, tmp_path, lambda g: g.attrs.__setitem__("weights_sha256", "0" * 64))
    rc, out, err = run(capsys, "evaluate", tmp_path / "h", other, "--split", "train")
    assert_one_line_error(rc, err, "evaluate", "do not match", "weights 000000000000")
    rc, out, err = run(capsys, "evaluate", tmp_path / "h", digits_store, "--model", "vit_small")
    assert_one_line_error(rc, err, "evaluate", "has no model 'vit_small'", "it holds: test_resnet")


def test_head_dir_holding_another_head_is_kept(digits_store, tmp_path, capsys):
    assert run(capsys, "fit-head", digits_store, "--head", "ridge", "--out", tmp_path / "h")[0] == 0
    before = (tmp_path / "h" / "head.json").read_text()
    rc, out, err = run(capsys, "fit-head", digits_store, "--head", "knn", "--out", tmp_path / "h")
    assert_one_line_error(rc, err, "fit-head", "already holds a different head", "--overwrite")
    weights_file = json.loads(before)["serialization"]["file"]
    assert (tmp_path / "h" / "head.json").read_text() == before and (tmp_path / "h" / weights_file).exists()
    rc, out, err = run(capsys, "fit-head", digits_store, "--head", "knn", "--out", tmp_path / "h", "--overwrite")
    assert rc == 0 and json.loads((tmp_path / "h" / "head.json").read_text())["head"] == "knn"
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    rc, out, err = run(capsys, "fit-head", digits_store, "--head", "knn", "--out", tmp_path / "stuff", "--overwrite")
    assert_one_line_error(rc, err, "fit-head", "holds no featx head")
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "mine"


def test_predict_end_to_end(split_folder, tmp_path, capsys, caplog):
    torch.manual_seed(1)
    ckpt = tmp_path / "backbone.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), ckpt)
    store = tmp_path / "f.h5"
    assert run(capsys, "extract", split_folder, "--model", "test_resnet", "--weights", ckpt, "--img-size", 32, "--out", store,
               "--workers", 0, "--no-progress")[0] == 0
    rc, out, err = run(capsys, "fit-head", store, "--head", "logreg", "--out", tmp_path / "head", "--json")
    assert rc == 0, err
    fitted = json.loads(out.strip().splitlines()[-1])
    assert fitted["test_split"] == "test" and fitted["test_split_description"] == "split 'test'"  # values, prose apart
    new = make_image_folder(tmp_path / "new", per_class=3, seed=500)
    (new / "class1" / "broken.png").write_bytes(b"not an image")
    rc, out, err = run(capsys, "predict", tmp_path / "head", new, "--out", tmp_path / "pred.csv", "--workers", 0, "--no-progress")
    assert rc == 0, err
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    assert len(rows) == 10 and set(rows[0]) >= {"path", "label", "probability", "error"}
    broken = [r for r in rows if r["path"].endswith("broken.png")]
    assert len(broken) == 1 and broken[0]["label"] == "" and broken[0]["error"]
    good = [r for r in rows if r["label"]]
    assert len(good) == 9 and all(0 < float(r["probability"]) <= 1 for r in good)
    assert sum(r["label"] == r["true_label"] for r in good) >= 7  # colour classes through the same backbone
    assert "1 images could not be read" in caplog.text and "broken.png" in caplog.text and "1 unreadable" in out
    # the checkpoint changed since extraction: refused, by hash
    torch.manual_seed(2)
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), ckpt)
    rc, out, err = run(capsys, "predict", tmp_path / "head", new, "--out", tmp_path / "pred2.csv", "--workers", 0)
    assert_one_line_error(rc, err, "predict", "hash to", "restore the original checkpoint")
    assert not (tmp_path / "pred2.csv").exists()
