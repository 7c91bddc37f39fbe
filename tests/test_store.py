"""The HDF5 feature store: round trip, metadata, lazy reads, worker use and the resumable journal."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from featx import ExtractConfig, FeatureStore, extract, load_features, resolve_source
from featx.errors import FeatxError
from featx.store import JournalWriter, journal_path

from conftest import make_image_folder

METADATA = ("model", "weights_sha256", "data_config", "img_size", "pooling", "dtype", "featx_version", "timm_version",
            "torch_version", "created", "image_list_sha256", "class_names", "split_names", "preprocessing", "precision")


def _cfg(model="test_resnet", **kw) -> ExtractConfig:
    """Small and fast: 64 px input, no decoding workers, batches of 4."""
    kw = {"weights": "random", "batch_size": 4, "workers": 0, "img_size": 64, "progress": False, **kw}
    return ExtractConfig(model=model, **kw)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """split_folder-like images, two models in one store."""
    root = tmp_path_factory.mktemp("store")
    make_image_folder(root / "imgs", per_class=6, splits=("train",))
    make_image_folder(root / "imgs", per_class=3, splits=("test",), seed=1000)
    out = root / "f.h5"
    extract(str(root / "imgs"), _cfg(), out)
    extract(str(root / "imgs"), _cfg("test_vit", dtype="float16"), out)
    return out


def test_round_trip_and_metadata(store_path):
    src = resolve_source(store_path.parent / "imgs")
    with FeatureStore(store_path) as store:
        assert store.models() == ["test_resnet", "test_vit"]
        fs = store.read("test_resnet")
        attrs = store.attrs("test_resnet")
        assert store.class_names("test_resnet") == ["class0", "class1", "class2"]
        assert store.split_names("test_resnet") == ["test", "train"]
        assert store.skipped("test_resnet") == []
    assert fs.X.shape == (27, 96) and fs.X.dtype == np.float32 and np.isfinite(fs.X).all()
    assert fs.ids.tolist() == src.ids and fs.y.tolist() == src.labels.tolist() and fs.splits.tolist() == src.splits
    for name in METADATA:
        assert name in attrs and attrs[name] != "", name
    assert attrs["model"] == "test_resnet" and attrs["img_size"] == 64 and attrs["dtype"] == "float32"
    assert attrs["image_list_sha256"] == src.fingerprint() and attrs["torch_version"] == str(torch.__version__)
    assert json.loads(attrs["data_config"])["interpolation"] == "bilinear" and attrs["pooling"] == "avg"
    assert attrs["weights"] == "random" and len(attrs["weights_sha256"]) == 64
    assert attrs["n_rows"] == 27 and attrs["complete"]


def test_several_models_and_float16(store_path):
    vit = load_features(store_path, "test_vit")
    assert vit.X.shape == (27, 64) and vit.X.dtype == np.float32
    with h5py.File(store_path) as f:
        assert f["test_vit/features"].dtype == np.float16 and f["test_resnet/features"].dtype == np.float32
    with pytest.raises(FeatxError, match="several models"):
        load_features(store_path)
    with pytest.raises(FeatxError, match="no model 'nope'.*test_resnet, test_vit"):
        load_features(store_path, "nope")


def test_split_and_row_slice_read_only_what_is_asked(store_path, monkeypatch):
    full = load_features(store_path, "test_resnet")
    reads = []
    orig = h5py.Dataset.__getitem__

    def spy(self, sel):
        if self.name.endswith("/features"):
            reads.append(sel)
        return orig(self, sel)

    with FeatureStore(store_path) as store:
        monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
        test = store.read("test_resnet", split="test")
        part = store.read("test_resnet", split="train", rows=slice(2, 5))
        monkeypatch.undo()
        with pytest.raises(FeatxError, match="no split 'val'"):
            store.read("test_resnet", split="val")
    assert set(test.splits) == {"test"} and len(test) == 9
    assert np.array_equal(test.X, full.X[full.splits == "test"])
    train_rows = np.flatnonzero(full.splits == "train")[2:5]
    assert np.array_equal(part.X, full.X[train_rows]) and part.ids.tolist() == full.ids[train_rows].tolist()
    n_read = [s.stop - s.start for s in reads]
    assert sum(n_read) == 9 + 3, reads  # only the asked rows, each contiguous run as one slice


class _Rows(Dataset):
    def __init__(self, store):
        self.store = store

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return self.store.read("test_resnet", rows=slice(i, i + 1)).X[0], os.getpid()


def test_store_in_dataloader_workers(store_path):
    store = FeatureStore(store_path)
    expected = store.read("test_resnet").X[:6]  # the parent holds an open handle before the workers start
    clone = pickle.loads(pickle.dumps(store))
    assert clone._file is None and clone.path == store.path
    loader = DataLoader(_Rows(store), batch_size=2, num_workers=2)
    X, pids = map(torch.cat, zip(*loader))
    assert np.array_equal(X.numpy(), expected)
    assert os.getpid() not in set(pids.tolist()) and len(set(pids.tolist())) == 2
    store.close()


def test_missing_or_foreign_store(tmp_path):
    with pytest.raises(FeatxError, match="does not exist; create it with 'featx extract"):
        FeatureStore(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(FeatxError, match="not an HDF5"):
        FeatureStore(tmp_path / "text.h5")


# -- the journal: interrupted runs resume, damaged journals are discarded ------------------
class _Stop(BaseException):
    pass


def _interrupt_after(monkeypatch, n_batches: int):
    """Make the n-th journal write raise, as a kill right after it would."""
    orig, calls = JournalWriter.write_batch, []

    def write_batch(self, *a, **k):
        orig(self, *a, **k)
        calls.append(1)
        if len(calls) == n_batches:
            raise _Stop

    monkeypatch.setattr(JournalWriter, "write_batch", write_batch)


@pytest.fixture(scope="module")
def resume_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    imgs = make_image_folder(root / "imgs", per_class=5)
    (imgs / "class1" / "bad.png").write_bytes(b"")  # a skip in the middle of the grid
    ref = root / "ref.h5"
    extract(str(imgs), _cfg(), ref)
    return imgs, load_features(ref)


def _interrupted(tmp_path, monkeypatch, imgs, n_batches=2):
    out = tmp_path / "f.h5"
    _interrupt_after(monkeypatch, n_batches)
    with pytest.raises(_Stop):
        extract(str(imgs), _cfg(), out)
    monkeypatch.undo()
    journal = journal_path(out, "test_resnet")
    assert journal.exists() and not out.exists()
    return out, journal


def _assert_same(out, ref):
    fs = load_features(out)
    assert np.array_equal(fs.X, ref.X) and fs.ids.tolist() == ref.ids.tolist() and np.array_equal(fs.y, ref.y)
    with FeatureStore(out) as store:
        assert store.skipped() == [("class1/bad.png", "empty file (0 bytes)")]


def test_resume_after_interrupt(tmp_path, monkeypatch, resume_case):
    imgs, ref = resume_case
    out, journal = _interrupted(tmp_path, monkeypatch, imgs, n_batches=3)
    with h5py.File(journal, "r") as f:
        assert f["test_resnet"].attrs["next_image"] == 12
    result = extract(str(imgs), _cfg(), out)
    assert result.resumed_from == 12 and result.n_processed == 16 - 12 and not journal.exists()
    _assert_same(out, ref)


def test_resume_keeps_the_original_batch_grid(tmp_path, monkeypatch, resume_case, caplog):
    imgs, ref = resume_case
    out, _ = _interrupted(tmp_path, monkeypatch, imgs)
    result = extract(str(imgs), _cfg(batch_size=5), out)
    assert result.resumed_from == 8 and "batch size 4" in caplog.text
    _assert_same(out, ref)


def test_journal_rows_past_the_progress_are_dropped(tmp_path, monkeypatch, resume_case):
    """A kill between writing a batch's rows and its progress: the extra rows are discarded on resume."""
    imgs, ref = resume_case
    out, journal = _interrupted(tmp_path, monkeypatch, imgs)
    with h5py.File(journal, "a") as f:
        g = f["test_resnet"]
        g["features"].resize(11, axis=0)
        g["features"][8:] = 7.0
    result = extract(str(imgs), _cfg(), out)
    assert result.resumed_from == 8
    _assert_same(out, ref)


@pytest.mark.parametrize("damage", ["garbage", "zero_rows", "progress_ahead", "truncated"])
def test_damaged_journal_restarts_and_never_gives_wrong_rows(tmp_path, monkeypatch, resume_case, damage, caplog):
    imgs, ref = resume_case
    out, journal = _interrupted(tmp_path, monkeypatch, imgs)
    if damage == "garbage":
        journal.write_bytes(b"\0garbage" * 100)
    elif damage == "truncated":
        data = journal.read_bytes()
        journal.write_bytes(data[: len(data) // 2])
    else:
        with h5py.File(journal, "a") as f:
            g = f["test_resnet"]
            if damage == "zero_rows":  # rows lost although progress vouches for them (half-flushed chunk)
                g["features"][2:4] = 0.0
            else:  # progress recorded past the rows actually written
                g.attrs.update({"n_rows": 10, "next_image": 10})
    result = extract(str(imgs), _cfg(), out)
    assert result.resumed_from == 0 and result.n_processed == 16 and "discarding" in caplog.text
    _assert_same(out, ref)


def test_journal_with_other_settings_is_refused(tmp_path, monkeypatch, resume_case):
    imgs, _ = resume_case
    out, journal = _interrupted(tmp_path, monkeypatch, imgs)
    before = hashlib.sha256(journal.read_bytes()).hexdigest()
    with pytest.raises(FeatxError, match="interrupted extraction with different .*img_size.*delete that file"):
        extract(str(imgs), _cfg(img_size=96), out)
    assert hashlib.sha256(journal.read_bytes()).hexdigest() == before


def test_a_ctrl_c_during_a_journal_write_waits_for_the_batch_and_then_interrupts(tmp_path, monkeypatch):
    """A Ctrl-C that lands while a batch is written is held until its rows and their progress are both in the journal,
    then delivered: the journal verifies and resumes from that batch (a Ctrl-C between two progress attributes had left
    a journal that no longer verified, and the resume discarded every row)."""
    import signal

    from featx.store import _journal

    seen = []
    real = _journal._progress_digest

    def interrupted_digest(hashers, rows, *rest):  # the Ctrl-C arrives mid-write, after the rows, before the progress
        if rows and not seen:
            seen.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return real(hashers, rows, *rest)

    monkeypatch.setattr(_journal, "_progress_digest", interrupted_digest)
    out = tmp_path / "f.h5"
    key = _journal.StoreKey(model="m", weights_sha256="w", data_config="{}", preprocessing="host", img_size=32, pooling="avg",
                            precision="fp32", dtype="float32", image_list_sha256="x")
    writer = JournalWriter(out, "m", key, {}, dim=3, n_images=4, batch_size=2, split_names=["train"])
    with pytest.raises(KeyboardInterrupt):
        writer.write_batch(2, np.ones((2, 3), np.float32), np.arange(2), ["a", "b"], np.zeros(2, np.int64), np.zeros(2, np.int8), [])
    assert seen and int(writer.g.attrs["n_rows"]) == 2 and int(writer.g.attrs["next_image"]) == 2  # the whole batch landed
    writer.close()
    monkeypatch.setattr(_journal, "_progress_digest", real)
    again = JournalWriter(out, "m", key, {}, dim=3, n_images=4, batch_size=2, split_names=["train"])
    assert again.next_image == 2  # verified and resumed, not discarded
    again.close()
