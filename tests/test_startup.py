"""Answers before the heavy imports: a cache-hit extract and the commands' argument and path checks load neither torch,
timm nor scikit-learn, and the early cache-hit decision never says "hit" where the full plan would not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import pytest
import timm
import torch

from conftest import make_image_folder
from featx import ExtractConfig
from featx.extraction import cache_hits, check_extraction, extract_many
from featx.errors import FeatxError
from featx.store import journal_path

pytestmark = pytest.mark.usefixtures("one_thread")
HEAVY = ("torch", "timm", "sklearn")

# Runs featx's command line in a fresh interpreter: every (argv, expected exit code), then prints what was imported.
RUNNER = """
import contextlib, io, json, sys
from featx.cli import main
runs = []
for argv in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    runs.append([code, out.getvalue(), err.getvalue()])
print(json.dumps({"runs": runs, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def _fresh(argvs: list[list[str]], cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argvs)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A folder of 3 x 4 images with train/test splits, a checkpoint file, and the store extracted from them."""
    root = tmp_path_factory.mktemp("startup")
    images = make_image_folder(root / "images", per_class=4, splits=("train", "test"))
    weights = root / "resnet.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    config = ExtractConfig(model="test_resnet", weights=str(weights), img_size=32, device="cpu", workers=0, progress=False)
    extract_many(str(images), [config], root / "f.h5")
    return root, images, config


def _argv(images, config, out) -> list[str]:
    return ["extract", str(images), "--model", config.model, "--weights", config.weights, "--img-size", str(config.img_size),
            "--device", "cpu", "--out", str(out), "--no-progress"]


def test_a_cache_hit_and_info_import_neither_torch_nor_timm_nor_scikit_learn(store):
    root, images, config = store
    ran = _fresh([_argv(images, config, root / "f.h5") + ["--json"], ["info", str(root / "f.h5")]], root)
    (code, stdout, stderr), (info_code, info, _) = ran["runs"]
    assert code == 0 and ran["heavy"] == [], (ran["heavy"], stderr)
    assert stdout.startswith("Cache hit: 'test_resnet'") and json.loads(stdout.splitlines()[-1])["cache_hit"]
    assert info_code == 0 and "test_resnet: model test_resnet, 24 rows (test 12, train 12), dim 96" in info


def test_mistakes_are_refused_before_the_heavy_imports(store):
    root, images, config = store
    missing = str(root / "missing")
    cases = [
        (["extract", missing, "--model", "test_resnet", "--weights", "random", "--out", str(root / "g.h5")], "source '"),
        (["extract", str(images), "--model", "test_resnet", "--weights", missing + ".pth", "--out", str(root / "g.h5")], "does not exist"),
        (["extract", str(images), "--model", "test_resnet", "--weights", "random", "--out", str(root)], "is not an HDF5 feature store"),
        (["fit-head", missing + ".h5", "--head", "logreg", "--out", str(root / "h")], "does not exist"),
        (["fit-head", str(root / "f.h5"), "--head", "svm", "--out", str(root / "h")], "unknown head 'svm'"),
        (["fit-head", str(root / "f.h5"), "--head", "logreg", "--model", "nope", "--out", str(root / "h")], "has no model 'nope'"),
        (["evaluate", missing, str(root / "f.h5")], "does not exist"),
        (["predict", missing, str(images), "--out", str(root / "p.csv")], "does not exist"),
        (["finetune", missing, "--model", "test_resnet", "--out", str(root / "run")], "source '"),
        (["finetune", str(images), "--model", "test_resnet", "--freeze", "half", "--out", str(root / "run")], "bad --freeze"),
        (["compare", str(images), "--model", "test_resnet=random", "--heads", "logreg,svm", "--out", str(root / "cmp")], "unknown head svm"),
        (["info", missing], "does not exist"),
    ]
    ran = _fresh([argv for argv, _ in cases], root)
    for (argv, fragment), (code, stdout, stderr) in zip(cases, ran["runs"]):
        assert code == 2 and stdout == "" and stderr.startswith(f"featx {argv[0]}: error: "), (argv, stderr)
        assert fragment in stderr and stderr.count("\n") == 1, (argv, stderr)
    assert ran["heavy"] == []
    assert not (root / "cmp").exists() and not (root / "run").exists() and not (root / "h").exists()


def _full_path_hit(images, configs, out) -> bool | None:
    """Whether the full plan calls it a cache hit (None: it refuses)."""
    try:
        return all(r.cache_hit for r in extract_many(str(images), configs, out))
    except FeatxError:
        return None


@pytest.mark.parametrize("change", ["none", "img_size", "layers", "dtype", "weights", "touched_image", "added_image",
                                    "precision", "device_auto", "no_request", "journal"])
def test_the_early_cache_hit_agrees_with_the_full_plan(store, tmp_path, change):
    import shutil

    root, images, config = store
    work = tmp_path / "copy"
    shutil.copytree(root, work, copy_function=shutil.copy2)  # keeps file times: the copy is the same image list
    images, out = work / "images", work / "f.h5"
    config = replace(config, weights=str(work / "resnet.pth"))
    if change == "img_size":
        config = replace(config, img_size=48)
    elif change == "layers":
        config = replace(config, layers="last,-1")
    elif change == "dtype":
        config = replace(config, dtype="float16")
    elif change == "weights":
        torch.manual_seed(1)
        torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), work / "resnet.pth")
    elif change == "touched_image":
        path = next(images.rglob("*.png"))
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    elif change == "added_image":
        make_image_folder(images, per_class=5, splits=("test",), seed=900)
    elif change == "precision":
        config = replace(config, precision="bf16")
    elif change == "device_auto":
        config = replace(config, device="auto")
    elif change == "no_request":  # a store written before requests were recorded
        with h5py.File(out, "r+") as f:
            del f["test_resnet"].attrs["key_request"]
    elif change == "journal":
        journal_path(out, "test_resnet").write_bytes(b"")
    src = check_extraction(str(images), [config], out)
    fast = cache_hits(src, [config], out)
    if change in ("none", "device_auto") and not any(os.path.exists(f) for f in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")):
        assert fast is not None and fast[0].cache_hit and fast[0].n_rows == 24  # decided early
    elif change in ("none", "device_auto"):
        assert fast is None  # a GPU could be used: the full plan decides
    else:
        assert fast is None
    if fast is not None:
        assert _full_path_hit(images, [config], out) is True
        full = extract_many(str(images), [config], out)[0]
        assert fast[0].summary() == full.summary() and fast[0].n_images == full.n_images


def test_a_scikit_learn_head_is_fitted_and_evaluated_without_torch(store):
    root, _, _ = store
    head = root / "ncm"
    ran = _fresh([["fit-head", str(root / "f.h5"), "--head", "ncm", "--sweep", "--out", str(head), "--no-progress"],
                  ["evaluate", str(head), str(root / "f.h5")]], root)
    assert [code for code, _, _ in ran["runs"]] == [0, 0], ran["runs"]
    assert ran["heavy"] == ["sklearn"]  # the command needs scikit-learn, and only it
