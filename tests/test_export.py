"""featx export: the ONNX graph and the timm checkpoint give what featx predict gives, on every image."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_image_folder
from featx import ExtractConfig, FitHeadConfig, extract, fit_head
from featx.cli import main
from featx.configs import ExportConfig, PredictConfig
from featx.errors import FeatxError
from featx.exporting import export_classifier
from featx.heads import full_scores, heads_score_map, make_head
from featx.metrics import softmax
from featx.prediction import predict_images

ort = pytest.importorskip("onnxruntime", reason="featx export --format onnx needs pip install 'featx[onnx]'")

pytestmark = pytest.mark.usefixtures("one_thread")
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
TINY = dict(model="test_efficientnet", weights="random", img_size=48, preprocess="host", workers=0, runtime="torch", progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Images (train 3 x 6, test 3 x 3) and their test_efficientnet store, preprocessed by timm's PIL transform."""
    root = tmp_path_factory.mktemp("export")
    images = make_image_folder(root / "images", per_class=6, splits=("train",), size=(52, 40))
    make_image_folder(images, per_class=3, splits=("test",), seed=1000, size=(40, 60))
    extract(str(images), ExtractConfig(**TINY), root / "features.h5")
    return root


def _head(tiny: Path, name: str, **options) -> Path:
    out = tiny / f"head-{name}-{len(options)}"
    if not out.is_dir():
        fit_head(tiny / "features.h5", FitHeadConfig(head=name, device="cpu", progress=False, **options), out)
    return out


def _predicted(head_dir: Path, images: Path, out: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(image paths, probabilities [n, K] in labels order, labels) from featx predict's CSV."""
    predict_images(head_dir, str(images), out, PredictConfig(top_k=100, runtime="torch", progress=False))
    rows = list(csv.DictReader(out.open()))
    labels = sorted({r["label"] for r in rows} | {r[k] for r in rows for k in r if k.startswith("label_")} - {""})
    probs = np.zeros((len(rows), len(labels)))
    for i, r in enumerate(rows):
        for k in [k for k in r if k == "label" or k.startswith("label_")]:
            probs[i, labels.index(r[k])] = float(r[k.replace("label", "probability")])
    return [r["path"] for r in rows], probs, labels


def _inputs(export_dir: Path, paths: list[str]) -> np.ndarray:
    """The export's input for each image, by timm's own eval transform (what predict did on these host-preprocessed features)."""
    from timm.data import create_transform, resolve_data_config
    from PIL import Image

    config = json.loads((export_dir / "preprocess.json").read_text())["data_config"]
    tf = create_transform(**resolve_data_config(config))
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in paths]).numpy()


def _onnx(export_dir: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return tuple(session.run(["probabilities", "features"], {"images": x}))


def _in_labels_order(p: np.ndarray, export_dir: Path, labels: list[str]) -> np.ndarray:
    names = (export_dir / "labels.txt").read_text().splitlines()
    return p[:, [names.index(c) for c in labels]]


def assert_same_as_predict(export_dir: Path, head_dir: Path, images: Path, tmp_path: Path, *, timm_too: bool) -> np.ndarray:
    paths, expected, labels = _predicted(head_dir, images, tmp_path / "predictions.csv")
    x = _inputs(export_dir, paths)
    got, features = _onnx(export_dir, x)
    got = _in_labels_order(got, export_dir, labels)
    assert (got.argmax(1) == expected.argmax(1)).all()  # top-1 identical on every image
    assert np.abs(got - expected).max() <= 1e-4
    if timm_too:
        import timm

        config = json.loads((export_dir / "config.json").read_text())
        overlay = dict(file=str(export_dir / "model.safetensors"), num_classes=config["num_classes"])
        for model in (timm.create_model(f"local-dir:{export_dir}", pretrained=True),
                      timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay)):
            with torch.inference_mode():
                p = _in_labels_order(model.eval()(torch.from_numpy(x)).softmax(1).numpy(), export_dir, labels)
            assert (p.argmax(1) == expected.argmax(1)).all() and np.abs(p - expected).max() <= 1e-4
    return features


@pytest.mark.parametrize("name", ["logreg", pytest.param("mlp"), "ncm",
                                  *[pytest.param(h, marks=pytest.mark.slow) for h in ("ridge", "linear-svm", "torch-linear")]])
def test_exported_heads_give_predicts_probabilities(tiny, name, tmp_path):
    head = _head(tiny, name)
    result = export_classifier(head, tmp_path / "export")
    linear_on_pooled = name not in ("mlp", "ncm")
    assert result.formats == (["onnx", "timm"] if linear_on_pooled else ["onnx"])
    assert (tmp_path / "export" / "labels.txt").read_text().splitlines() == ["class0", "class1", "class2"]
    assert_same_as_predict(tmp_path / "export", head, tiny / "images", tmp_path, timm_too=linear_on_pooled)


@pytest.mark.parametrize("name", ["logreg", "ridge", "linear-svm", "torch-linear", "ncm"])
@pytest.mark.parametrize("n_classes", [2, 4])
def test_folded_map_gives_the_heads_scores(name, n_classes):
    """softmax(normalise(x) W^T + b) is what featx reports for the head, two classes (the one-margin heads) included."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(n_classes), 120 // n_classes)
    X = rng.normal(size=(120, 6)) + 2 * np.eye(6)[y] + 0.5
    pipe = make_head(name, device="cpu", params={"max_epochs": 5} if name == "torch-linear" else None).fit(X, y)
    prefix, W, b, classes = heads_score_map(pipe)
    Z = X
    for step in prefix:
        Z = step.transform(Z)
    assert np.abs(softmax(Z @ W.T + b) - full_scores(pipe, X, n_classes)).max() <= 1e-6


def test_taps_and_flip_are_exported_features_equal_the_store_rows(tiny, tmp_path):
    store = tmp_path / "taps.h5"
    extract(str(tiny / "images"), ExtractConfig(**{**TINY, "layers": "last,b-1,b-2", "tta": "flip"}), store)
    head = tmp_path / "head"
    fit_head(store, FitHeadConfig(head="logreg", tap_norm=True, device="cpu", progress=False), head)
    with pytest.raises(FeatxError, match="--format timm holds timm's own classifier.*L2-normalises"):
        export_classifier(head, tmp_path / "export", ExportConfig(formats="timm"))
    assert not (tmp_path / "export").exists()
    assert export_classifier(head, tmp_path / "export").not_written["timm"]
    features = assert_same_as_predict(tmp_path / "export", head, tiny / "images", tmp_path, timm_too=False)
    import featx

    rows = featx.open_store(store).read("test_efficientnet")
    paths = [str(p) for p in sorted((tiny / "images").rglob("*.png"))]
    order = {str(tiny / "images" / i): k for k, i in enumerate(rows.ids)}
    predicted_paths = [r["path"] for r in csv.DictReader((tmp_path / "predictions.csv").open())]
    assert sorted(predicted_paths) == paths
    assert np.abs(features - rows.X[[order[p] for p in predicted_paths]]).max() <= 1e-4


def _snippet() -> str:
    """The README's inference snippet: the ```py block of the export section."""
    section = README.split("## Exporting a classifier", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```py\n(.*?)```", section, flags=re.S)[0]


def test_readme_snippet_runs_verbatim_and_agrees_with_predict(tiny, tmp_path, monkeypatch, capsys):
    code = _snippet()
    assert len(code.strip().splitlines()) <= 10 and "featx" not in code and "torch" not in code
    head = _head(tiny, "logreg")
    export_classifier(head, tmp_path / "export")
    image = sorted((tiny / "images" / "test").rglob("*.png"))[4]
    from PIL import Image

    (tmp_path / "one").mkdir()
    Image.open(image).convert("RGB").save(tmp_path / "one" / "photo.jpg", quality=95)
    shutil.copy(tmp_path / "one" / "photo.jpg", tmp_path / "photo.jpg")
    _, expected, labels = _predicted(head, tmp_path / "one", tmp_path / "one.csv")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    label, probability = capsys.readouterr().out.split()
    assert label == labels[int(expected[0].argmax())] and abs(float(probability) - expected[0].max()) <= 1e-4


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_heads_that_are_not_one_network_are_refused_in_one_line(tiny, tmp_path, capsys):
    rc, err = run(capsys, "export", _head(tiny, "knn"), "--out", tmp_path / "export")
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("featx export: error: head 'knn' cannot be exported as one network")
    assert "logreg, ridge, linear-svm, torch-linear, ncm, mlp" in err[0]
    assert not (tmp_path / "export").exists()


def test_bad_inputs_get_one_line_and_leave_nothing_half_written(tiny, tmp_path, capsys, monkeypatch):
    head = _head(tiny, "logreg")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "mine.txt").write_text("keep")
    rc, err = run(capsys, "export", head, "--out", tmp_path / "export")
    assert rc == 2 and len(err) == 1 and "exists; pass --overwrite" in err[0]
    assert (tmp_path / "export" / "mine.txt").read_text() == "keep"

    moved = tmp_path / "moved-head"
    shutil.copytree(head, moved)
    meta = json.loads((moved / "head.json").read_text())
    meta["backbone"] = {**meta["backbone"], "weights": str(tmp_path / "gone.pth")}
    (moved / "head.json").write_text(json.dumps(meta))
    rc, err = run(capsys, "export", moved, "--out", tmp_path / "e2")
    assert rc == 2 and len(err) == 1 and "gone.pth', does not exist; pass its new location with --weights" in err[0]

    meta["backbone"] = {**meta["backbone"], "weights": "random", "layers": "last,b-1"}
    (moved / "head.json").write_text(json.dumps(meta))
    rc, err = run(capsys, "export", moved, "--out", tmp_path / "e3")
    assert rc == 2 and len(err) == 1 and "another store layout" in err[0]

    import featx.exporting._workflow as workflow

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(workflow, "write_labels", full_disk)
    with pytest.raises(OSError):
        export_classifier(head, tmp_path / "export", ExportConfig(overwrite=True))
    assert (tmp_path / "export" / "mine.txt").read_text() == "keep"  # the old folder stays until the new one is complete
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert not list((tmp_path / "e2").parent.glob("e2*")) and not (tmp_path / "e3").exists()


@pytest.mark.slow
def test_lite0_real_weights_export_equals_predict(tmp_path, lite0_weights):
    images = make_image_folder(tmp_path / "images", n_classes=3, per_class=8, size=(260, 200))
    extract(str(images), ExtractConfig(model="tf_efficientnet_lite0", weights=lite0_weights, preprocess="host", runtime="torch",
                                       workers=0, progress=False), tmp_path / "features.h5")
    head = tmp_path / "head"
    fit_head(tmp_path / "features.h5", FitHeadConfig(head="logreg", sweep=True, device="cpu", progress=False), head)
    export_classifier(head, tmp_path / "export")
    assert_same_as_predict(tmp_path / "export", head, images, tmp_path, timm_too=True)


@pytest.mark.slow
def test_fine_tuning_run_exports_equal_predict(tiny, tmp_path):
    from featx import FinetuneConfig, finetune

    run = tmp_path / "run"
    finetune(str(tiny / "images"), FinetuneConfig(model="test_efficientnet", img_size=48, epochs=1, batch_size=8, workers=0,
                                                  progress=False), run)
    result = export_classifier(run, tmp_path / "export")
    assert result.formats == ["onnx", "timm"] and result.what == "fine-tuning run"
    assert_same_as_predict(tmp_path / "export", run, tiny / "images", tmp_path, timm_too=True)


def test_rbf_svm_is_refused_before_anything_is_loaded(tiny, tmp_path):
    with pytest.raises(FeatxError, match="head 'rbf-svm' cannot be exported as one network .*support vectors.*export works for logreg"):
        export_classifier(_head(tiny, "rbf-svm"), tmp_path / "export")
    assert not (tmp_path / "export").exists()
