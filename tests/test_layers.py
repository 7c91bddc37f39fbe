"""Features beyond the last layer: pooled stage taps and flip averaging, cached and used like any features."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import timm
import torch

from conftest import make_image_folder
from featx import ExtractConfig, FeatureStore, extract, load_features
from featx.cli import main
from featx.embedder import ImageEmbedder
from featx.heads import HEADS

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(weights="random", img_size=64, batch_size=8, workers=0, progress=False)


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_vit"])
def test_taps_equal_the_pooled_outputs_of_timms_own_api(image_folder, name):
    size = 160 if name == "test_vit" else 64
    embedder = ImageEmbedder(name, img_size=size, layers="last,-1,-3", device="cpu", workers=0, preprocess="host").fit()
    from featx.sources import resolve_source

    src = resolve_source(image_folder)
    got = embedder.transform(src)
    model = timm.create_model(name, num_classes=0, **({"img_size": size} if name == "test_vit" else {})).eval()
    torch.manual_seed(0)
    model.load_state_dict(embedder.model_.state_dict())
    x = torch.stack([embedder.transform_(src.load(i)) for i in range(len(src))])
    with torch.inference_mode():
        final, (third, last_stage) = model.forward_intermediates(x, indices=[-3, -1])
        want = torch.cat([model.forward_head(final, pre_logits=True), last_stage.mean((2, 3)), third.mean((2, 3))], 1)
    assert got.shape == tuple(want.shape)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    ranges = json.loads(embedder.taps_json())
    assert [r["tap"] for r in ranges] == ["last", "-1", "-3"] and ranges[-1]["stop"] == got.shape[1]


def test_block_taps_are_the_pooled_outputs_of_blocks(image_folder):
    from featx.sources import resolve_source

    src = resolve_source(image_folder)
    embedder = ImageEmbedder("test_efficientnet", img_size=64, layers="last,b-1,b-2", device="cpu", workers=0, preprocess="host").fit()
    x = torch.stack([embedder.transform_(src.load(i)) for i in range(len(src))])
    model = embedder.model_.eval()
    with torch.inference_mode():
        final, blocks = model.forward_intermediates(x, indices=[-2, -1], extra_blocks=True)
        want = torch.cat([model.forward_head(final, pre_logits=True), blocks[1].mean((2, 3)), blocks[0].mean((2, 3))], 1)
    np.testing.assert_allclose(embedder.transform(src), want.numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="b-1 .. b-6"):
        ImageEmbedder("test_efficientnet", layers="last,b-9", device="cpu").fit()


def test_flip_averages_the_input_and_its_mirror(image_folder):
    from featx.sources import resolve_source

    src = resolve_source(image_folder)
    flipped = ImageEmbedder("test_resnet", img_size=64, device="cpu", workers=0, tta="flip", preprocess="host").fit()
    x = torch.stack([flipped.transform_(src.load(i)) for i in range(len(src))])
    with torch.inference_mode():
        want = (flipped.model_(x) + flipped.model_(x.flip(3))) / 2
    np.testing.assert_allclose(flipped.transform(src), want.numpy(), rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        assert not np.allclose(want.numpy(), flipped.model_(x).numpy(), atol=1e-4)  # the mirror changes something


def test_store_records_taps_and_the_cache_key_includes_them(image_folder, tmp_path, capsys):
    out = tmp_path / "f.h5"
    extract(str(image_folder), ExtractConfig(model="test_resnet", **FAST), out)
    config = ExtractConfig(model="test_resnet", layers="last,-1,-2", tta="flip", key="stages", **FAST)
    extract(str(image_folder), config, out)
    with FeatureStore(out) as store:
        attrs = store.attrs("stages")
        assert attrs["layers"] == "last,-1,-2" and attrs["tta"] == "flip" and store.read("stages").X.shape == (12, 96 + 96 + 192)
        assert [t["tap"] for t in json.loads(attrs["taps"])] == ["last", "-1", "-2"]
        assert store.attrs("test_resnet")["layers"] == "last"
    rc = main(["extract", str(image_folder), "--model", "test_resnet", "--weights", "random", "--layers", "last,-1", "--out", str(out),
               "--key", "stages", "--img-size", "64", "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "different layers, tta" in err  # a changed tap list is never a stale cache hit


def test_a_stage_the_model_does_not_have_is_a_one_line_error(image_folder, tmp_path, capsys):
    for layers, fragment in (("last,-9", "has 5 stages; use -1 .. -5"), ("last,first", "unknown --layers entry 'first'"),
                             ("-1,-1", "names '-1' twice"), ("last,b-1", "has no block taps")):
        rc = main(["extract", str(image_folder), "--model", "test_resnet", "--weights", "random", "--layers", layers,  # '-1,-1' too
                   "--out", str(tmp_path / "f.h5"), "--workers", "0", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "f.h5").exists()


def test_old_stores_without_taps_are_still_cache_hits(image_folder, tmp_path):
    out = tmp_path / "f.h5"
    extract(str(image_folder), ExtractConfig(model="test_resnet", **FAST), out)
    with h5py.File(out, "r+") as f:  # as written before taps existed
        for k in ("layers", "tta", "taps"):
            del f["test_resnet"].attrs[k]
    assert extract(str(image_folder), ExtractConfig(model="test_resnet", **FAST), out).cache_hit


@pytest.mark.parametrize("head", list(HEADS))
def test_every_head_fits_on_tapped_features(head, tmp_path_factory, capsys):
    from featx import FitHeadConfig
    from featx.fitting import plan_fit
    from featx.head_folder import load_head

    store = _tapped_store(tmp_path_factory)
    params = ["--param", "max_epochs=5"] if head in ("torch-linear", "mlp") else []
    out = store.parent / f"head-{head}"
    rc = main(["fit-head", str(store), "--head", head, "--out", str(out), "--no-progress", "--json", *params])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    reported = json.loads(stdout.strip().splitlines()[-1])
    with FeatureStore(store) as fs:  # the rows fit-head tested on, by its own rule
        test = fs.read("test_resnet", rows=plan_fit(fs, store, FitHeadConfig(head=head), None).test_rows)
    loaded = load_head(out)  # the head read back from its folder scores those rows as the fitted head did
    assert loaded.meta["feature_dim"] == 96 + 96 + 192 and reported["n_test"] == len(test) > 0
    assert np.mean(loaded.pipeline.predict(test.X) == test.y) == pytest.approx(reported["accuracy"])


def test_predict_rebuilds_the_taps(tmp_path_factory, tmp_path, capsys):
    store = _tapped_store(tmp_path_factory)
    head = store.parent / "head-predict"
    assert main(["fit-head", str(store), "--head", "logreg", "--out", str(head)]) == 0
    new = make_image_folder(tmp_path / "new", per_class=2, seed=77)
    rc = main(["predict", str(head), str(new), "--out", str(tmp_path / "p.csv"), "--workers", "0", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and len(list(csv.DictReader(open(tmp_path / "p.csv")))) == 6 and "accuracy" in out
    meta = json.loads((head / "head.json").read_text())
    assert meta["backbone"]["layers"] == "last,-1,-2" and meta["feature_dim"] == 96 + 96 + 192


@pytest.mark.parametrize("head", ["knn", "logreg"])
def test_tap_norm_gives_every_tap_unit_norm_and_survives_the_head_folder(head, tmp_path_factory, tmp_path, capsys):
    from sklearn.pipeline import Pipeline

    from featx.head_folder import load_head
    from featx.heads import full_scores
    from featx.heads._taps import TapNormalizer

    store = _tapped_store(tmp_path_factory)
    out = tmp_path / head
    assert main(["fit-head", str(store), "--head", head, "--tap-norm", "--out", str(out), "--no-progress"]) == 0
    loaded = load_head(out)
    step = loaded.pipeline.named_steps["taps"]
    assert isinstance(step, TapNormalizer) and [tuple(b) for b in step.blocks] == [(0, 96), (96, 192), (192, 384)]
    X = load_features(store).X
    Z = step.transform(X)
    norms = [np.linalg.norm(Z[:, a:b], axis=1) for a, b in step.blocks]
    np.testing.assert_allclose(norms, 1 / np.sqrt(3), rtol=1e-5)
    by_hand = np.concatenate([X[:, a:b] / np.linalg.norm(X[:, a:b], axis=1, keepdims=True) for a, b in step.blocks], 1) / np.sqrt(3)
    rest = Pipeline(loaded.pipeline.steps[1:])  # the loaded head scores through the per-tap normalisation, not around it
    np.testing.assert_allclose(loaded.scores(X), full_scores(rest, by_hand, len(loaded.class_names)), rtol=1e-4, atol=1e-6)
    flat = tmp_path / "flat.h5"
    extract(str(store.parent / "imgs"), ExtractConfig(model="test_resnet", **FAST), flat)
    capsys.readouterr()
    assert main(["fit-head", str(flat), "--head", head, "--tap-norm", "--out", str(tmp_path / "x")]) == 2
    assert "needs features of several taps" in capsys.readouterr().err


_TAPPED: dict = {}


def _tapped_store(tmp_path_factory):
    if "store" not in _TAPPED:
        root = tmp_path_factory.mktemp("tapped")
        imgs = make_image_folder(root / "imgs", per_class=8)
        extract(str(imgs), ExtractConfig(model="test_resnet", layers="last,-1,-2", **FAST), root / "f.h5")
        _TAPPED["store"] = root / "f.h5"
    return _TAPPED["store"]
