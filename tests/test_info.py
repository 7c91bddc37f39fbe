"""featx info: a store, a head folder or a run folder described in a few lines, or as JSON."""

from __future__ import annotations

import json

import h5py
import pytest

from conftest import make_image_folder
from featx import ExtractConfig, extract
from featx.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(weights="random", img_size=32, workers=0, progress=False)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A store of two groups (one with stage taps and flip averaging) from 3 x 4 train + 3 x 2 test images and one broken
    file, and a logreg head fitted on the first group."""
    root = tmp_path_factory.mktemp("info")
    images = make_image_folder(root / "images", per_class=4, splits=("train",))
    make_image_folder(images, per_class=2, splits=("test",), seed=100)
    (images / "train" / "class0" / "broken.png").write_bytes(b"not an image")
    store = root / "f.h5"
    extract(str(images), ExtractConfig(model="test_resnet", **FAST), store)
    extract(str(images), ExtractConfig(model="test_efficientnet", layers="last,-1", tta="flip", **FAST), store)
    assert main(["fit-head", str(store), "--model", "test_resnet", "--head", "logreg", "--out", str(root / "head"), "--no-progress"]) == 0
    return store, root / "head"


def _info(capsys, *argv) -> tuple[int, str, str]:
    code = main(["info", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_store_in_a_few_lines_and_as_json(outputs, capsys):
    store, _ = outputs
    code, text, _ = _info(capsys, store)
    assert code == 0 and text.splitlines()[0] == f"{store}: feature store, 2 groups"
    assert "test_resnet: model test_resnet, 18 rows (test 6, train 12), dim 96, 1 skipped" in text
    assert "taps last,-1, flip yes" in text and len(text.splitlines()) == 5
    code, text, _ = _info(capsys, store, "--json")
    described = json.loads(text)
    groups = {e["group"]: e for e in described["entries"]}
    assert described["kind"] == "store" and set(groups) == {"test_resnet", "test_efficientnet"}
    with h5py.File(store) as f:
        for key, e in groups.items():
            a = f[key].attrs
            assert e["rows"] == len(f[key]["features"]) == 18 and e["dim"] == f[key]["features"].shape[1]
            assert e["weights_sha256"] == a["weights_sha256"] and e["created"] == a["created"] and e["skipped"] == 1
    assert groups["test_resnet"]["rows_per_split"] == {"test": 6, "train": 12}
    assert groups["test_efficientnet"]["taps"] == ["last", "-1"] and groups["test_efficientnet"]["flip"] is True
    assert groups["test_resnet"]["taps"] == ["last"] and groups["test_resnet"]["flip"] is False


def test_a_head_folder(outputs, capsys):
    store, head = outputs
    meta = json.loads((head / "head.json").read_text())
    code, text, _ = _info(capsys, head, "--json")
    (e,) = json.loads(text)["entries"]
    assert code == 0 and e["head"] == "logreg" and e["group"] == "test_resnet" and e["dim"] == meta["feature_dim"] == 96
    assert e["accuracy"] == meta["metrics"]["accuracy"] and e["accuracy_ci"][0] <= e["accuracy"] <= e["accuracy_ci"][1]
    assert e["n_test"] == 6 and e["weights_sha256"] == meta["backbone"]["weights_sha256"]
    code, text, _ = _info(capsys, head)
    assert f"test accuracy {e['accuracy']:.3f} (" in text and "on 6 rows (test)" in text and text.startswith(f"{head}: head folder")


def test_what_info_does_not_describe_is_a_one_line_error(outputs, capsys):
    store, _ = outputs
    for path, fragment in ((store.parent / "images", "neither a head folder"), (store.parent / "images" / "train" / "class0" / "000.png",
                                                                                  "not an HDF5 feature store")):
        code, out, err = _info(capsys, path)
        assert code == 2 and out == "" and fragment in err and err.count("\n") == 1, err
