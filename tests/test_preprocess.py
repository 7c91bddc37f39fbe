"""Device preprocessing reproduces timm's eval transform (resize, centre crop, normalise)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from featx.preprocess import DevicePreprocessor, Geometry

# (model whose timm data config is used, input size override): bicubic and bilinear, crop_pct 0.95 and 0.875
CONFIGS = [("test_resnet", None), ("test_efficientnet", None), ("tf_efficientnet_lite0", None), ("test_vit", 96)]
SIZES = [(32, 32), (20, 30), (7, 3), (1, 1), (160, 160), (168, 168), (300, 250), (90, 500), (640, 97), (183, 244)]


def _transform(name: str, img_size: int | None):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    config = resolve_data_config({"input_size": (3, img_size, img_size)} if img_size else {}, pretrained_cfg=cfg)
    return config, create_transform(**config, is_training=False)


def _images(w: int, h: int):
    rng = np.random.default_rng(w * 1000 + h)
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 127 // max(w + h - 2, 1)], -1)
    return [Image.fromarray(noise), Image.fromarray(smooth.astype(np.uint8))]


@pytest.mark.parametrize("name, img_size", CONFIGS)
def test_device_matches_timm_transform(name, img_size):
    config, tf = _transform(name, img_size)
    geometry = Geometry.from_transform(tf)
    assert geometry is not None and geometry.interpolation == config["interpolation"]
    pre = DevicePreprocessor(geometry)
    std = torch.tensor(config["std"]).view(3, 1, 1) * 255  # normalised units -> 0-255 pixel levels
    worst, differing, total = 0.0, 0, 0
    for w, h in SIZES:
        images = _images(w, h)
        expected = torch.stack([tf(im) for im in images])
        got = pre([pre.host_prepare(im) for im in images], "cpu")
        assert got.shape == expected.shape == (2, 3, *geometry.crop)
        levels = ((got - expected).abs() * std).round()  # differences in 8-bit pixel levels
        worst, differing, total = max(worst, float(levels.max())), differing + int((levels > 0).sum()), total + levels.numel()
    # Pillow's own weights in its fixed point, each pass rounded and clipped to 8 bits: the very same pixels
    assert differing == 0, f"{name}: {differing} of {total} pixels differ, by up to {worst:g} levels"


def test_mixed_sizes_keep_batch_order():
    _, tf = _transform("test_resnet", None)
    pre = DevicePreprocessor(Geometry.from_transform(tf))
    images = [im for w, h in [(20, 30), (300, 250), (20, 30), (50, 50)] for im in _images(w, h)[:1]]
    got = pre([pre.host_prepare(im) for im in images], "cpu")
    for k, im in enumerate(images):
        assert torch.allclose(got[k], tf(im), atol=1e-5)


def test_unsupported_transform_gives_none():
    assert Geometry.from_transform(create_transform(input_size=(3, 64, 64), is_training=True)) is None


def test_host_and_device_features_agree():
    from featx.embedder import ImageEmbedder
    from featx.sources import resolve_source

    from conftest import make_image_folder

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        src = resolve_source(make_image_folder(Path(d), n_classes=2, per_class=3, size=(70, 50)))
        feats = {}
        for mode in ("host", "device"):
            embedder = ImageEmbedder("test_efficientnet", device="cpu", batch_size=4, preprocess=mode, workers=0).fit()
            assert embedder.preprocess_ == mode
            feats[mode] = np.concatenate([b.features for b in embedder.iter_batches(src)])
            model = embedder.model_
    a, b = feats["host"], feats["device"]
    assert a.shape == (6, model.num_features) and np.allclose(a, b, rtol=1e-4, atol=1e-5)  # the same pixels in, the same features out
