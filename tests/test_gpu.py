"""CUDA paths: run with ``python -m pytest -m gpu`` on a machine with a GPU (deselected by default)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featx import ExtractConfig, extract
from featx.heads import TorchLinearClassifier
from featx.preprocess import DevicePreprocessor, Geometry, eval_transform
from featx.store import load_features

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_device_preprocessing_on_cuda_matches_cpu():
    import timm

    _, tf = eval_transform(timm.create_model("test_resnet", num_classes=0))
    pre = DevicePreprocessor(Geometry.from_transform(tf))
    rng = np.random.default_rng(0)
    images = [pre.host_prepare(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))) for h, w in [(32, 32), (50, 70), (32, 32)]]
    cpu = pre(images, "cpu")
    gpu = pre(images, "cuda").cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4)


def test_extract_on_cuda_matches_cpu(image_folder, tmp_path):
    common = dict(model="test_resnet", weights="random", img_size=64, progress=False, batch_size=4)
    extract(image_folder, ExtractConfig(device="cpu", precision="fp32", **common), tmp_path / "cpu.h5")
    extract(image_folder, ExtractConfig(device="cuda", precision="fp32", **common), tmp_path / "gpu.h5")
    extract(image_folder, ExtractConfig(device="cuda", precision="bf16", **common), tmp_path / "bf16.h5")
    cpu, gpu, bf16 = (load_features(tmp_path / f"{n}.h5") for n in ("cpu", "gpu", "bf16"))
    assert list(cpu.ids) == list(gpu.ids) == list(bf16.ids)
    assert np.allclose(cpu.X, gpu.X, rtol=1e-3, atol=1e-3)
    cos = (cpu.X * bf16.X).sum(1) / (np.linalg.norm(cpu.X, axis=1) * np.linalg.norm(bf16.X, axis=1))
    assert cos.min() > 0.99


def test_torch_linear_head_trains_on_cuda():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (4, 16))
    y = np.repeat(np.arange(4), 50)
    X = (centres[y] + rng.normal(0, 1, (200, 16))).astype(np.float32)
    clf = TorchLinearClassifier(device="cuda", max_epochs=50).fit(X, y)
    assert clf.score(X, y) > 0.9
