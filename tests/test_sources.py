"""Image sources: folder layouts, CSV manifests and the named datasets."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from featx.errors import FeatxError
from featx.sources import FASHION_MNIST_DIR, resolve_source

from conftest import make_image_folder, write_image


def test_flat_layout(image_folder):
    src = resolve_source(image_folder)
    assert len(src) == 12
    assert src.class_names == ["class0", "class1", "class2"]
    assert src.ids[:2] == ["class0/000.png", "class0/001.png"]
    assert src.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert set(src.splits) == {"train"}
    assert src.load(5).mode == "RGB" and src.load(5).size == (40, 32)


@pytest.mark.parametrize("names", [("train", "val"), ("train", "valid", "test")])
def test_split_first_layout(tmp_path, names):
    root = tmp_path / "data"
    for k, split in enumerate(names):
        make_image_folder(root, n_classes=2, per_class=2, splits=(split,), seed=100 * k)
    src = resolve_source(root)
    assert src.split_names == sorted(names)
    assert len(src) == 4 * len(names)
    assert src.class_names == ["class0", "class1"]
    i = src.ids.index(f"{names[-1]}/class1/001.png")
    assert src.splits[i] == names[-1] and src.labels[i] == 1


def test_split_names_and_fingerprint(split_folder):
    src = resolve_source(split_folder)
    assert src.split_names == ["test", "train"]
    assert src.splits.count("train") == 18 and src.splits.count("test") == 9
    assert resolve_source(split_folder).fingerprint() == src.fingerprint()
    write_image(split_folder / "train" / "class0" / "extra.png", (1, 2, 3))
    assert resolve_source(split_folder).fingerprint() != src.fingerprint()


def test_csv_manifest(tmp_path, image_folder):
    csv = tmp_path / "list.csv"
    csv.write_text(
        "path,label,split\n"
        f"{image_folder.name}/class0/000.png,cat,train\n"
        f"{image_folder.name}/class1/000.png,dog,test\n"
        f"{image_folder.name}/class2/000.png,,test\n"  # unlabeled
        f"{image_folder.name}/class2/001.png,cat,\n"  # split defaults to train
    )
    src = resolve_source(csv)
    assert src.class_names == ["cat", "dog"]
    assert src.labels.tolist() == [0, 1, -1, 0]
    assert src.splits == ["train", "test", "test", "train"]
    assert np.asarray(src.load(1)).shape == (32, 40, 3)  # paths resolve relative to the CSV


def test_csv_without_split_and_numeric_labels(tmp_path, image_folder):
    csv = image_folder / "m.csv"
    csv.write_text("Path,Label\nclass0/000.png,10\nclass0/001.png,2\nclass1/000.png,2\n")
    src = resolve_source(csv)
    assert src.class_names == ["2", "10"]  # natural order
    assert src.labels.tolist() == [1, 0, 0] and set(src.splits) == {"train"}


def test_csv_missing_columns(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("file,class\na.png,1\n")
    with pytest.raises(FeatxError, match="lacks column\\(s\\) path, label.*path,label\\[,split\\]"):
        resolve_source(csv)


def test_csv_with_extra_values_in_a_row(tmp_path, image_folder):
    csv = image_folder / "m.csv"
    csv.write_text("path,label\nclass0/000.png,a,stray,values\nclass0/001.png,b\n")
    assert resolve_source(csv).class_names == ["a", "b"]


@pytest.mark.parametrize("spec, message", [
    ("nope/does-not-exist", "does not exist"),
    ("empty", "no images found"),
    ("file.txt", "not a .csv manifest"),
])
def test_bad_sources(tmp_path, spec, message):
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FeatxError, match=message):
        resolve_source(tmp_path / spec)


def test_digits():
    src = resolve_source("digits")
    assert len(src) == 1797 and src.class_names == [str(i) for i in range(10)]
    img = src.load(0)
    assert img.mode == "RGB" and img.size == (8, 8)
    assert src.arrays.max() == 255 and np.asarray(img)[..., 0].tolist() == src.arrays[0].tolist()  # 0..16 -> 0..255


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_a_folder(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    src = resolve_source(f"fashion-mnist:{tmp_path}")
    assert len(src) == 8 and src.split_names == ["train", "test"]
    assert src.labels.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert src.ids[5] == "fashion-mnist/test/0" and src.class_names[9] == "Ankle boot"
    assert src.load(7).size == (28, 28)


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(FeatxError, match="apt-get install dataset-fashion-mnist"):
        resolve_source(f"fashion-mnist:{tmp_path}")


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="needs 'apt-get install dataset-fashion-mnist'")
def test_fashion_mnist_real_files():
    src = resolve_source("fashion-mnist")
    assert src.arrays.shape == (70000, 28, 28)
    assert src.splits.count("train") == 60000 and np.bincount(src.labels).tolist() == [7000] * 10
