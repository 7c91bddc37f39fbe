"""featx extract end to end: cache hits, key conflicts, user errors, kill-and-resume in a subprocess."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import timm
import torch

from featx import ExtractConfig, FeatureStore, extract, load_features
from featx.cli import main
from featx.store import journal_path

from conftest import make_image_folder

FAST = ["--batch-size", "4", "--img-size", "64", "--workers", "0", "--no-progress"]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(capsys, *args):
    rc = main(["extract", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(**{"model": "test_resnet", "weights": "random", "batch_size": 4, "workers": 0, "img_size": 64, "progress": False, **kw})


@pytest.fixture
def store(tmp_path, image_folder, capsys):
    out = tmp_path / "f.h5"
    rc, summary, _ = _run(capsys, image_folder, "--model", "test_resnet", "--weights", "random", "--out", out, *FAST)
    assert rc == 0 and "Extracted 12 images" in summary and "0 skipped" in summary and str(out) in summary
    return out


def test_cache_hit_does_no_work(store, image_folder, capsys):
    before = _sha(store)
    result = extract(str(image_folder), _cfg(workers=1), store)  # decoding workers are not part of the key
    assert result.cache_hit and result.n_processed == 0 and result.n_rows == 12
    assert _sha(store) == before
    rc, summary, _ = _run(capsys, image_folder, "--model", "test_resnet", "--weights", "random", "--out", store, *FAST)
    assert rc == 0 and summary.startswith("Cache hit") and _sha(store) == before


@pytest.mark.parametrize("change, field", [("weights", "weights_sha256"), ("img_size", "img_size"), ("images", "image_list_sha256")])
def test_key_conflict_is_refused(store, image_folder, tmp_path, capsys, change, field):
    args = [image_folder, "--model", "test_resnet", "--weights", "random", "--out", store, *FAST]
    if change == "weights":
        torch.manual_seed(7)
        torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "other.pth")
        args[args.index("random")] = tmp_path / "other.pth"
    elif change == "img_size":
        args[args.index("64")] = "96"
    else:
        (image_folder / "class0" / "000.png").rename(image_folder / "class0" / "renamed.png")
    before = _sha(store)
    rc, _, err = _run(capsys, *args)
    assert rc == 2 and _sha(store) == before
    assert err.count("\n") == 1 and "already holds 'test_resnet' made with different" in err and field in err
    assert "--key" in err and "--overwrite" in err
    rc, summary, _ = _run(capsys, *args, "--key", "variant")  # --key writes a new group beside it
    assert rc == 0 and "under 'variant'" in summary
    with FeatureStore(store) as s:
        assert s.models() == ["test_resnet", "variant"] and s.attrs("variant")[field] != s.attrs("test_resnet")[field]


def test_overwrite_replaces_the_group(store, image_folder, capsys):
    old = load_features(store)
    rc, _, _ = _run(capsys, image_folder, "--model", "test_vit", "--weights", "random", "--out", store, "--key", "vit", *FAST)
    vit = load_features(store, "vit")
    rc, summary, _ = _run(capsys, image_folder, "--model", "test_resnet", "--weights", "random", "--out", store, "--overwrite",
                           *[a if a != "64" else "96" for a in FAST])
    assert rc == 0 and "Extracted 12 images" in summary
    with FeatureStore(store) as s:
        assert s.models() == ["test_resnet", "vit"] and s.attrs("test_resnet")["img_size"] == 96
        new = s.read("test_resnet")
        assert np.array_equal(s.read("vit").X, vit.X)
    assert new.ids.tolist() == old.ids.tolist() and not np.allclose(new.X, old.X)


def test_host_preprocessing_run(store, image_folder, capsys):
    rc, summary, _ = _run(capsys, image_folder, "--model", "test_resnet", "--weights", "random", "--out", store, "--preprocess", "host",
                           "--key", "host", *FAST)
    assert rc == 0 and "Extracted 12 images" in summary
    with FeatureStore(store) as s:
        host, dev = s.read("host").X, s.read("test_resnet").X
        assert '"mode": "host"' in s.attrs("host")["preprocessing"]
    cos = (host * dev).sum(1) / np.linalg.norm(host, axis=1) / np.linalg.norm(dev, axis=1)
    assert cos.min() > 0.999


@pytest.mark.parametrize("case, message", [
    ("missing_source", "does not exist"),
    ("empty_folder", "no images found"),
    ("csv_columns", "lacks column(s) path"),  # a label column is optional since unlabeled CSVs are read too
    ("unknown_model", "did you mean test_resnet"),
    ("bad_weights", "does not exist"),
    ("garbage_weights", "weights_only"),
    ("out_folder_missing", "folder"),
    ("out_is_folder", "is not an HDF5 feature store"),
    ("out_not_hdf5", "is not an HDF5 feature store"),
    ("fp16_on_cpu", "fp16 compute is not supported on CPU"),
])
def test_user_errors_are_one_line_exit_2_and_lose_nothing(store, image_folder, tmp_path, capsys, case, message):
    src, model, out, extra, weights = image_folder, "test_resnet", store, [], ["--weights", "random"]
    if case == "missing_source":
        src = tmp_path / "nope"
    elif case == "empty_folder":
        src = tmp_path / "empty"
        (src / "class0").mkdir(parents=True)
    elif case == "csv_columns":
        src = tmp_path / "m.csv"
        src.write_text("file,label\nimages/class0/000.png,a\n")
    elif case == "unknown_model":
        model = "test_resnett"
    elif case == "bad_weights":
        weights = ["--weights", tmp_path / "missing.pth"]
    elif case == "garbage_weights":
        (tmp_path / "garbage.pth").write_bytes(b"\x80\x04garbage")
        weights = ["--weights", tmp_path / "garbage.pth"]
    elif case == "out_folder_missing":
        out = tmp_path / "no" / "such" / "f.h5"
    elif case == "out_is_folder":
        out = tmp_path / "a_folder.h5"
        out.mkdir()
    elif case == "out_not_hdf5":
        out = tmp_path / "notes.h5"
        out.write_text("precious notes")
    elif case == "fp16_on_cpu":
        extra = ["--precision", "fp16", "--device", "cpu", "--key", "half"]
    before = {p: _sha(p) for p in tmp_path.rglob("*") if p.is_file()}
    rc, stdout, err = _run(capsys, src, "--model", model, *weights, "--out", out, *FAST, *extra)
    assert rc == 2 and stdout == ""
    assert err.startswith("featx extract: error: ") and err.count("\n") == 1 and message in err, err
    assert {p: _sha(p) for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written, nothing lost


# -- kill and resume in a subprocess ------------------------------------------------------
def _default_sigint() -> None:
    """In the child: SIGINT back to its default, so Python turns it into KeyboardInterrupt as in a terminal.

    A non-interactive shell starts background jobs with SIGINT ignored, and a child inherits the ignore;
    featx rightly keeps an inherited ignore, so without this a suite run in the background never sees the Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "featx", "extract", *map(str, args)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_sigint)


def _wait_for_rows(proc, journal, min_rows: int, timeout: float = 120.0) -> int:
    """Poll the journal (without locking it) until ``min_rows`` rows are recorded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "extraction finished before it could be interrupted: " + proc.stderr.read()
        try:
            with h5py.File(journal, "r", locking=False) as f:
                rows = int(f["test_efficientnet"].attrs["n_rows"])
            if rows >= min_rows:
                return rows
        except (OSError, KeyError):
            pass
        time.sleep(0.02)
    raise AssertionError("no progress in the journal")


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    imgs = make_image_folder(root / "imgs", per_class=400, size=(24, 20))  # ~3 s to extract: a signal lands mid-run
    (imgs / "class1" / "zero.png").write_bytes(b"")
    ref = root / "ref.h5"
    extract(str(imgs), ExtractConfig(model="test_efficientnet", weights="random", batch_size=4, img_size=64, workers=0, progress=False), ref)
    return imgs, load_features(ref)


def _assert_matches(out, ref):
    fs = load_features(out, "test_efficientnet")
    assert fs.ids.tolist() == ref.ids.tolist() and np.array_equal(fs.y, ref.y)
    assert np.array_equal(fs.X, ref.X)  # same batch grid, same kernels: exactly the uninterrupted features


def test_sigkill_then_resume(tmp_path, many_images, capsys):
    imgs, ref = many_images
    out = tmp_path / "f.h5"
    extract(str(imgs), _cfg(key="other"), out)  # the store already holds another group
    other, before = load_features(out, "other"), _sha(out)
    args = [imgs, "--model", "test_efficientnet", "--weights", "random", "--out", out, "--batch-size", "4", "--img-size", "64",
            "--no-progress"]
    proc = _start(args, tmp_path)
    journal = journal_path(out, "test_efficientnet")
    try:
        rows = _wait_for_rows(proc, journal, 12)
        os.kill(proc.pid, signal.SIGKILL)  # the main process only: its orphaned decoding worker exits by itself
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and rows < len(ref)
    assert _sha(out) == before  # the killed run never touched the store
    with FeatureStore(out) as s:
        assert s.models() == ["other"]
    with h5py.File(journal, "r", locking=False) as f:  # the journal opens
        assert f["test_efficientnet"].attrs["n_rows"] >= rows
    rc, summary, _ = _run(capsys, *args)
    assert rc == 0 and "resumed at image" in summary and not journal.exists()
    _assert_matches(out, ref)
    assert np.array_equal(load_features(out, "other").X, other.X)


def test_ctrl_c_gives_one_line_exit_130_and_resumes(tmp_path, many_images, capsys):
    imgs, ref = many_images
    out = tmp_path / "f.h5"
    args = [imgs, "--model", "test_efficientnet", "--weights", "random", "--out", out, "--batch-size", "4", "--img-size", "64",
            "--no-progress"]
    proc = _start(args, tmp_path)
    try:
        _wait_for_rows(proc, journal_path(out, "test_efficientnet"), 8)
        os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C in a terminal: the whole process group
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "featx extract: interrupted; rerun the same command to resume"
    rc, summary, _ = _run(capsys, *args)
    assert rc == 0 and "resumed at image" in summary
    _assert_matches(out, ref)


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_a_model_that_widens_after_pooling_stores_the_width_it_embeds(image_folder, tmp_path, runtime):
    # MobileNetV3's head conv comes after the pooling: 1024 features from 576 channels (it failed writing the first batch)
    pytest.importorskip("onnxruntime") if runtime == "onnx" else None
    out = tmp_path / "m.h5"
    extract(str(image_folder), ExtractConfig(model="mobilenetv3_small_050", weights="random", img_size=32, workers=0,
                                             progress=False, runtime=runtime), out)
    model = timm.create_model("mobilenetv3_small_050", num_classes=0)
    assert load_features(out).X.shape == (12, model.head_hidden_size) and model.head_hidden_size != model.num_features
