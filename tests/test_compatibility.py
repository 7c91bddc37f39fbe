"""Stores and head folders written by featx 0.1.0 (tests/fixtures/release-0.1.0) still load and give the same results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featx import ExtractConfig, FeatureStore, extract, load_features, load_head

from conftest import make_image_folder

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "release-0.1.0"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


def test_store_of_release_0_1_0_reads_back():
    with FeatureStore(FIXTURES / "features.h5") as store:
        assert store.models() == ["test_resnet", "test_vit"]
        assert store.split_names("test_resnet") == ["test", "train"]
        assert store.skipped("test_resnet") == [("train/class1/broken.png", "not a readable image (unknown format or corrupt header)")]
        fs = store.read("test_resnet")
        vit = store.read("test_vit", split="test")
    want = EXPECTED["store"]["test_resnet"]
    assert fs.ids.tolist() == want["ids"] and fs.y.tolist() == want["labels"] and fs.splits.tolist() == want["splits"]
    assert float(fs.X.sum()) == pytest.approx(want["feature_sum"], rel=1e-6)
    assert vit.X.dtype == np.float32 and len(vit) == 6


@pytest.mark.parametrize("head", ["head-logreg", "head-torch-linear", "head-mlp-pca"])
def test_head_folders_of_release_0_1_0_predict_as_they_did(head):
    loaded = load_head(FIXTURES / head)
    fs = load_features(FIXTURES / "features.h5", EXPECTED[head]["model"])
    assert np.allclose(loaded.scores(fs.X), EXPECTED[head]["proba"], atol=2e-6)


def test_extraction_still_writes_what_release_0_1_0_wrote(tmp_path):
    imgs = make_image_folder(tmp_path / "images", per_class=4, splits=("train",))
    make_image_folder(tmp_path / "images", per_class=2, splits=("test",), seed=1000)
    (imgs / "train" / "class1" / "broken.png").write_bytes(b"not an image")
    config = ExtractConfig(model="test_resnet", weights="random", img_size=32, batch_size=4, workers=0, progress=False)
    extract(str(imgs), config, tmp_path / "f.h5")
    extract(str(imgs), ExtractConfig(**{**config.__dict__, "preprocess": "host"}), tmp_path / "host.h5")
    new, old = load_features(tmp_path / "f.h5"), load_features(FIXTURES / "features.h5", "test_resnet")
    # 0.1.0's batched resize was up to 1.45 pixel levels from timm's transform on upscaled images (these 40 x 32 ones);
    # now it is timm's pixel for pixel: the features are timm's own, and within that slack of 0.1.0's (3e-4 of 0.25 here)
    assert np.allclose(new.X, load_features(tmp_path / "host.h5").X, rtol=1e-5, atol=1e-5)  # threads may change rounding
    assert np.allclose(new.X, old.X, rtol=0, atol=2e-3) and not np.allclose(new.X, old.X, rtol=1e-5, atol=1e-5)
    assert new.ids.tolist() == old.ids.tolist() and new.splits.tolist() == old.splits.tolist()
    with FeatureStore(tmp_path / "f.h5") as a, FeatureStore(FIXTURES / "features.h5") as b:
        for k in ("model", "weights_sha256", "data_config", "preprocessing", "img_size", "pooling", "precision", "dtype"):
            assert a.attrs()[k] == b.attrs("test_resnet")[k], k
