"""A store grows at the cost of what is added: new groups and new images never rewrite what is there, and a kill never loses it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from featx import ExtractConfig, FeatureStore, extract, load_features, resolve_source
from featx.cli import main
from featx.store import data_dir, journal_path

from conftest import make_image_folder, write_image

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "release-0.1.0"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


def _cfg(model="test_resnet", **kw) -> ExtractConfig:
    return ExtractConfig(**{"model": model, "weights": "random", "batch_size": 4, "img_size": 32, "workers": 0, "progress": False, **kw})


def _hashes(out: Path) -> dict[str, str]:
    """sha256 of every group file in the store's folder."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data_dir(out).glob("*.h5"))}


def _same_rows(a, b) -> None:
    """Two FeatureSets hold the same images (matched by id), labels, splits and features."""
    order = np.argsort(a.ids)
    other = np.argsort(b.ids)
    assert a.ids[order].tolist() == b.ids[other].tolist()
    assert np.array_equal(a.y[order], b.y[other]) and a.splits[order].tolist() == b.splits[other].tolist()
    assert np.abs(a.X[order] - b.X[other]).max() < 1e-5


def test_adding_groups_leaves_the_existing_groups_bytes_untouched(tmp_path, image_folder):
    out = tmp_path / "f.h5"
    extract(str(image_folder), _cfg(), out)
    first = hashlib.sha256(out.read_bytes()).hexdigest()
    resnet = load_features(out)
    extract(str(image_folder), _cfg("test_vit"), out)  # the single-file store becomes an index, by a hard link
    (base,) = [p for p in data_dir(out).glob("*.h5") if ".base-" in p.name]
    assert hashlib.sha256(base.read_bytes()).hexdigest() == first and base.stat().st_nlink == 1
    before = _hashes(out)
    extract(str(image_folder), _cfg("test_efficientnet"), out)
    after = _hashes(out)
    assert {k: after[k] for k in before} == before and len(after) == len(before) + 1
    with h5py.File(out, "r") as f:  # plain h5py follows the links
        assert sorted(f) == ["test_efficientnet", "test_resnet", "test_vit"] and f["test_vit/features"].shape == (12, 64)
        assert isinstance(f.get("test_vit", getlink=True), h5py.ExternalLink)
    assert np.array_equal(load_features(out, "test_resnet").X, resnet.X)


def test_a_store_of_release_0_1_0_is_added_to_without_a_copy(tmp_path, image_folder):
    out = tmp_path / "old.h5"
    shutil.copy(FIXTURES / "features.h5", out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    extract(str(image_folder), _cfg("test_efficientnet"), out)
    with FeatureStore(out) as store:
        assert store.models() == ["test_efficientnet", "test_resnet", "test_vit"]
        fs = store.read("test_resnet")
    assert fs.ids.tolist() == EXPECTED["store"]["test_resnet"]["ids"] and fs.digests is None
    assert float(fs.X.sum()) == pytest.approx(EXPECTED["store"]["test_resnet"]["feature_sum"], rel=1e-6)
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in data_dir(out).glob("*.base-*.h5")] == [digest]


@pytest.fixture(scope="module")
def thousand(tmp_path_factory):
    root = tmp_path_factory.mktemp("thousand")
    imgs = make_image_folder(root / "imgs", n_classes=4, per_class=250, size=(12, 10))
    return imgs


def test_ten_images_added_to_a_thousand_embed_ten(tmp_path, thousand):
    imgs = tmp_path / "imgs"
    shutil.copytree(thousand, imgs)
    out = tmp_path / "f.h5"
    first = extract(str(imgs), _cfg(batch_size=64), out)
    assert first.n_processed == 1000
    part, before = hashlib.sha256(out.read_bytes()).hexdigest(), load_features(out)
    for i in range(10):
        write_image(imgs / f"class{i % 5}" / f"new{i}.png", (90, 90, 90), size=(12, 10), seed=5000 + i)  # class4 is new
    grown = extract(str(imgs), _cfg(batch_size=64), out)
    assert grown.n_processed == 10 and grown.added_to == 1000 and grown.n_rows == 1010 and not grown.cache_hit
    assert "Extracted 10 new images (added to the 1000 already stored)" in grown.summary()
    src, store = resolve_source(imgs), load_features(out)
    new = [i for i, image_id in enumerate(src.ids) if "/new" in image_id]
    extract(src.subset(new), _cfg(batch_size=64), tmp_path / "new.h5")  # the ten alone, as the append embedded them
    assert np.array_equal(store.X[1000:], load_features(tmp_path / "new.h5").X) and np.array_equal(store.X[:1000], before.X)
    assert store.class_names == src.class_names == [f"class{c}" for c in range(5)]
    with FeatureStore(out) as s:
        assert s.attrs()["image_list_sha256"] == src.fingerprint() and s.attrs()["image_stamps_sha256"] == src.stamps_fingerprint()
        index = s.file["test_resnet/index"][:]
    assert sorted(index.tolist()) == list(range(1010)) and [src.ids[i] for i in index] == store.ids.tolist()
    assert store.y.tolist() == src.labels[index].tolist() and store.splits.tolist() == [src.splits[i] for i in index]
    assert part in {hashlib.sha256(p.read_bytes()).hexdigest() for p in data_dir(out).glob("*.h5")}  # the 1000 rows, untouched
    assert extract(str(imgs), _cfg(batch_size=64), out).cache_hit


def _run(capsys, *args):
    rc = main(["extract", *map(str, args)])
    return (rc, *capsys.readouterr())


@pytest.mark.parametrize("change", ["replaced", "removed", "relabelled"])
def test_a_changed_image_is_never_a_silent_cache_hit(tmp_path, image_folder, capsys, change):
    out = tmp_path / "f.h5"
    args = [image_folder, "--model", "test_resnet", "--weights", "random", "--out", out, "--img-size", "32", "--batch-size", "4",
            "--no-progress"]
    assert _run(capsys, *args)[0] == 0
    target = image_folder / "class0" / "001.png"
    stat = target.stat()
    if change == "replaced":  # another image under the same name (the same size is likely; the time differs)
        write_image(target, (10, 200, 10), seed=77)
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    elif change == "removed":
        target.unlink()
    else:
        (image_folder / "class2").mkdir(exist_ok=True)
        target.rename(image_folder / "class2" / "001.png")
    before = load_features(out)
    rc, stdout, err = _run(capsys, *args)
    assert rc == 2 and err.count("\n") == 1 and "--overwrite" in err, err
    if change != "relabelled":
        assert "class0/001.png" in err and ("changed since" if change == "replaced" else "removed") in err
    assert np.array_equal(load_features(out).X, before.X)
    rc, stdout, _ = _run(capsys, *args, "--overwrite")
    assert rc == 0 and "Extracted" in stdout
    new = load_features(out)
    if change == "replaced":
        k = new.ids.tolist().index("class0/001.png")
        assert not np.allclose(new.X[k], before.X[k]) and new.digests[k] != before.digests[k]


def test_several_models_in_one_pass_equal_separate_runs_and_decode_once(tmp_path, image_folder, capsys, monkeypatch):
    import featx.sources._source as source_module

    (image_folder / "class1" / "empty.png").write_bytes(b"")
    calls = []
    decode = source_module.decode_image
    monkeypatch.setattr(source_module, "decode_image", lambda data: calls.append(1) or decode(data))
    both = tmp_path / "both.h5"
    rc, stdout, _ = _run(capsys, image_folder, "--model", "test_resnet", "--model", "test_vit", "--weights", "random", "--weights",
                         "random", "--out", both, "--img-size", "32", "--batch-size", "4", "--no-progress", "--json")
    assert rc == 0 and stdout.count("Extracted 13 images") == 2
    assert len(calls) == 13  # each of the 13 files decoded once for both models (the empty one fails there)
    monkeypatch.undo()
    results = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert [r["key"] for r in results] == ["test_resnet", "test_vit"] and all(r["n_processed"] == 13 for r in results)
    for model in ("test_resnet", "test_vit"):
        alone = tmp_path / f"{model}.h5"
        extract(str(image_folder), _cfg(model), alone)
        a, b = load_features(both, model), load_features(alone)
        assert np.array_equal(a.X, b.X) and a.ids.tolist() == b.ids.tolist() and np.array_equal(a.y, b.y)
        with FeatureStore(both) as s, FeatureStore(alone) as t:
            assert s.skipped(model) == t.skipped() and s.attrs(model)["weights_sha256"] == t.attrs()["weights_sha256"]


def test_weights_per_model(tmp_path):
    from featx.configs import extract_configs
    from featx.errors import FeatxError

    base = ExtractConfig(model="a")
    assert [c.weights for c in extract_configs(base, ["a", "b"], ["b=/w/b.pth"])] == [None, "/w/b.pth"]
    assert [c.weights for c in extract_configs(base, ["a", "b"], ["/w/1.pth", "/w/2.pth"])] == ["/w/1.pth", "/w/2.pth"]
    assert [c.weights for c in extract_configs(base, ["a"], ["x=y.pth"])] == ["x=y.pth"]  # one model: a path, as before
    for models, weights, message in [(["a", "b"], ["/w/1.pth"], "1 --weights for 2 --model"),
                                     (["a", "b"], ["a=1.pth", "2.pth"], "NAME=PATH"), (["a", "a"], None, "given twice")]:
        with pytest.raises(FeatxError, match=message):
            extract_configs(base, models, weights)


# -- SIGKILL at any point of a commit or an append leaves the store readable, earlier groups intact ----------
CHILD = textwrap.dedent("""
    import os, signal, sys
    import featx
    from featx.store import _layout
    from featx.store import JournalWriter
    point = sys.argv[1]
    def kill(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "batch":
        orig, n = JournalWriter.write_batch, []
        def write_batch(self, *a, **k):
            orig(self, *a, **k)
            n.append(1)
            if len(n) == 2:
                kill()
        JournalWriter.write_batch = write_batch
    else:
        setattr(_layout.StoreCommit, point, kill)
    cfg = featx.ExtractConfig(model=sys.argv[4], weights="random", batch_size=4, img_size=32, workers=0, progress=False)
    featx.extract(sys.argv[2], cfg, sys.argv[3])
""")


def _killed_run(point: str, imgs: Path, out: Path, model: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, point, str(imgs), str(out), model], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize("point", ["batch", "publish", pytest.param("_drop_journals", marks=pytest.mark.slow)])
def test_sigkill_while_adding_a_group(tmp_path, image_folder, point):
    out = tmp_path / "f.h5"
    extract(str(image_folder), _cfg(), out)
    extract(str(image_folder), _cfg("test_vit"), out)
    before, resnet = _hashes(out), load_features(out, "test_resnet")
    _killed_run(point, image_folder, out, "test_efficientnet")
    with FeatureStore(out) as store:  # readable, with every earlier group intact
        assert store.models() == (["test_efficientnet"] if point == "_drop_journals" else []) + ["test_resnet", "test_vit"]
        assert np.array_equal(store.read("test_resnet").X, resnet.X)
    assert {k: v for k, v in _hashes(out).items() if k in before} == before
    result = extract(str(image_folder), _cfg("test_efficientnet"), out)
    assert result.cache_hit == (point == "_drop_journals")
    assert not journal_path(out, "test_efficientnet").exists()
    extract(str(image_folder), _cfg("test_efficientnet"), tmp_path / "alone.h5")
    assert np.array_equal(load_features(out, "test_efficientnet").X, load_features(tmp_path / "alone.h5").X)
    assert set(_hashes(out)) == set(before) | {n for n in _hashes(out) if n.startswith("test_efficientnet.")}
    assert len([n for n in _hashes(out) if n.startswith("test_efficientnet.")]) == 1  # a killed commit's files are cleaned up


@pytest.mark.parametrize("point", [pytest.param("batch", marks=pytest.mark.slow), "publish"])
def test_sigkill_while_adding_images(tmp_path, point):
    imgs = make_image_folder(tmp_path / "imgs", per_class=4)
    out = tmp_path / "f.h5"
    extract(str(imgs), _cfg(), out)
    extract(str(imgs), _cfg("test_vit"), out)
    before, resnet, vit = _hashes(out), load_features(out, "test_resnet"), load_features(out, "test_vit")
    for c in range(3):
        for i in range(4, 7):
            write_image(imgs / f"class{c}" / f"{i:03d}.png", (200, 200, 200), seed=800 + 10 * c + i)
    _killed_run(point, imgs, out, "test_resnet")
    with FeatureStore(out) as store:  # readable, the group as it was, the other group untouched
        assert store.models() == ["test_resnet", "test_vit"]
        assert np.array_equal(store.read("test_resnet").X, resnet.X) and np.array_equal(store.read("test_vit").X, vit.X)
    assert {k: v for k, v in _hashes(out).items() if k in before} == before
    result = extract(str(imgs), _cfg(), out)
    assert result.added_to == 12 and result.n_rows == 21 and result.n_processed == 9 - result.resumed_from
    assert result.resumed_from == (8 if point == "batch" else 9)
    extract(str(imgs), _cfg(), tmp_path / "fresh.h5")
    _same_rows(load_features(out, "test_resnet"), load_features(tmp_path / "fresh.h5"))


def test_fit_head_counts_test_images_that_are_training_images(tmp_path, split_folder, caplog):
    from featx import FitHeadConfig, fit_head

    dup = split_folder / "test" / "class0" / "dup.png"
    shutil.copy(split_folder / "train" / "class0" / "000.png", dup)
    shutil.copy(split_folder / "train" / "class1" / "000.png", split_folder / "test" / "class1" / "dup.png")
    out = tmp_path / "f.h5"
    extract(str(split_folder), _cfg(), out)
    result = fit_head(out, FitHeadConfig(head="knn"), tmp_path / "head")
    assert result.n_train_test_duplicates == 2 and result.to_dict()["n_train_test_duplicates"] == 2
    assert "2 of the 11 test rows show an image that is also in the training rows" in caplog.text
    old = fit_head(FIXTURES / "features.h5", FitHeadConfig(head="knn", model="test_resnet"), tmp_path / "old-head")
    assert old.n_train_test_duplicates is None and old.to_dict()["n_train_test_duplicates"] is None
