"""featx extract under torchrun: 2 CPU processes (gloo) give the one-process store; a killed rank resumes from its journal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from featx import ExtractConfig, FeatureStore, extract, load_features
from featx.store import journal_path

from conftest import make_image_folder

ARGS = ["--weights", "random", "--batch-size", "4", "--img-size", "64", "--no-progress"]


def _torchrun(args, cwd: Path, tag: str = "") -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FEATX_TEST_TAG": tag, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "featx", "extract",
           *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err


def _assert_same_store(out: Path, ref: Path, key: str) -> None:
    a, b = load_features(out, key), load_features(ref, key)
    assert a.ids.tolist() == b.ids.tolist() and np.array_equal(a.y, b.y) and a.splits.tolist() == b.splits.tolist()
    assert np.abs(a.X - b.X).max() < 1e-3
    with FeatureStore(out) as s, FeatureStore(ref) as r:
        assert s.skipped(key) == r.skipped(key) and s.attrs(key)["world_size"] == 2
        for name in ("model", "weights_sha256", "image_list_sha256", "image_stamps_sha256", "class_names", "split_names", "n_images"):
            assert s.attrs(key)[name] == r.attrs(key)[name], name
    with h5py.File(out, "r") as f:  # plain h5py reads the assembled group (a virtual dataset over the ranks' parts)
        assert f[key]["features"].shape == a.X.shape and f[key]["index"][:].tolist() == sorted(f[key]["index"][:].tolist())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    imgs = make_image_folder(root / "imgs", per_class=6, splits=("train",), size=(24, 20))
    make_image_folder(imgs, per_class=3, splits=("test",), size=(24, 20), seed=500)
    (imgs / "train" / "class1" / "broken.png").write_bytes(b"not an image")
    ref = root / "ref.h5"
    extract(str(imgs), ExtractConfig(model="test_resnet", weights="random", batch_size=4, img_size=64, workers=0, progress=False), ref)
    return imgs, ref


def test_two_processes_give_the_one_process_store_and_a_rerun_is_a_cache_hit(tmp_path, images):
    imgs, ref = images
    out = tmp_path / "f.h5"
    rc, stdout, err = _finish(_torchrun([imgs, "--model", "test_resnet", "--out", out, *ARGS], tmp_path))
    assert rc == 0, err
    assert "Rank 1 of 2: embedded 14 images" in err and "Extracted 28 images" in stdout and "Rank" not in stdout, stdout + err
    _assert_same_store(out, ref, "test_resnet")
    assert not list(tmp_path.glob("*.partial"))  # the ranks' journals went into the store
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.h5")}
    rc, stdout, err = _finish(_torchrun([imgs, "--model", "test_resnet", "--out", out, *ARGS], tmp_path))
    assert rc == 0 and stdout.count("Cache hit") == 1 and "Cache hit" in err, stdout + err  # rank 1 reports on stderr
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.h5")} == files


def _pid_of_rank(tag: str, rank: int, timeout: float = 60) -> int:
    """The process of ``rank`` in the torchrun job started with FEATX_TEST_TAG=tag (found by its environment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"FEATX_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
                return int(proc.name)
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} did not start")


def _rows(journal: Path, key: str) -> int:
    try:
        with h5py.File(journal, "r", locking=False) as f:
            return int(f[key].attrs["n_rows"])
    except (OSError, KeyError):
        return 0


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_kill_one_rank_then_rerun_resumes_every_rank_from_its_journal(tmp_path, images):
    imgs = make_image_folder(tmp_path / "imgs", per_class=40, size=(24, 20))
    ref = tmp_path / "ref.h5"
    extract(str(imgs), ExtractConfig(model="test_efficientnet", weights="random", batch_size=4, img_size=64, workers=0, progress=False), ref)
    out, tag = tmp_path / "f.h5", uuid.uuid4().hex
    args = [imgs, "--model", "test_efficientnet", "--out", out, *ARGS]
    proc = _torchrun(args, tmp_path, tag)
    journals = [journal_path(out, "test_efficientnet", f"rank{r}-of-2") for r in range(2)]
    try:
        victim = _pid_of_rank(tag, 1)
        deadline = time.monotonic() + 120
        while min(_rows(j, "test_efficientnet") for j in journals) < 8:  # both ranks are under way
            assert proc.poll() is None and time.monotonic() < deadline, "no progress before the kill"
            time.sleep(0.02)
        os.kill(victim, signal.SIGKILL)
        rc, _, err = _finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc != 0 and not out.exists()  # torchrun stopped the job; nothing was committed
    done = [_rows(j, "test_efficientnet") for j in journals]
    assert 8 <= done[1] < 60 and done[0] >= 8, done
    rc, stdout, err = _finish(_torchrun(args, tmp_path))
    assert rc == 0, err
    assert "(resumed at image" in stdout and "Rank 1 of 2" in err and "(resumed at image" in err.split("Rank 1 of 2")[1], stdout + err
    assert not any(j.exists() for j in journals)
    a, b = load_features(out), load_features(ref)
    assert a.ids.tolist() == b.ids.tolist() and np.array_equal(a.y, b.y) and np.abs(a.X - b.X).max() < 1e-3


def test_ranks_from_the_environment_and_their_shares(monkeypatch):
    from featx.distributed import Ranks, contiguous_shares, launched_ranks, rank_device

    monkeypatch.delenv("RANK", raising=False)
    assert launched_ranks() is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched_ranks() is None  # a job of one process runs as without torchrun
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ranks = launched_ranks()
    assert ranks == Ranks(3, 4, 1) and ranks.tag == "rank3-of-4" and not ranks.is_main
    assert rank_device("cpu", ranks) == "cpu" and rank_device("auto", ranks) in ("cpu", "cuda:0", "cuda:1")
    shares = contiguous_shares(10, 4)
    assert shares == [(0, 2), (2, 5), (5, 8), (8, 10)]  # contiguous, in order, every item once
    assert contiguous_shares(3, 4) == [(0, 1), (1, 2), (2, 2), (2, 3)]
