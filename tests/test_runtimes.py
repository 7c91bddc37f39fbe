"""--runtime: the exported graph in ONNX Runtime and OpenVINO gives the torch features, is cached, and falls back to torch."""

from __future__ import annotations

import logging
import shutil

import h5py
import numpy as np
import pytest
import torch

from conftest import make_image_folder, write_image
from featx import ExtractConfig, extract
from featx.cli import main
from featx.errors import FeatxError
from featx.runtimes import resolve_runtime, runtime_available

pytestmark = pytest.mark.usefixtures("one_thread")

TAPS = dict(model="test_efficientnet", weights="random", img_size=48, layers="last,b-1", tta="flip", workers=0, progress=False)


def _graph_runtime(name: str) -> str:
    if not runtime_available(name):
        pytest.skip(f"--runtime {name} needs pip install 'featx[{name}]'")
    return name


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("runtime_images") / "images", per_class=3)


@pytest.fixture(scope="module")
def torch_rows(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime_torch") / "torch.h5"
    extract(str(images), ExtractConfig(**TAPS, runtime="torch"), out)
    with h5py.File(out) as f:
        return f["test_efficientnet/features"][:], f["test_efficientnet"].attrs["runtime"]


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_graph_features_match_torch_with_taps_and_flip_and_are_exported_once(runtime, images, torch_rows, tmp_path, monkeypatch):
    _graph_runtime(runtime)
    out = tmp_path / "features.h5"
    extract(str(images), ExtractConfig(**TAPS, runtime=runtime), out)
    with h5py.File(out) as f:
        rows, recorded = f["test_efficientnet/features"][:], f["test_efficientnet"].attrs["runtime"]
    assert (recorded, torch_rows[1]) == (runtime, "torch")  # the store key records the runtime
    assert rows.shape == torch_rows[0].shape and np.abs(rows - torch_rows[0]).max() <= 1e-4
    assert len(list((tmp_path / "features.h5.onnx" / "test_efficientnet").glob("*.onnx"))) == 1

    import featx.runtimes

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(featx.runtimes, "export_onnx", no_export)  # the group's graph is reused: added images, or a rerun
    shutil.copytree(images, tmp_path / "more")
    write_image(tmp_path / "more" / "class0" / "new.png", (10, 20, 30))
    grown = extract(str(tmp_path / "more"), ExtractConfig(**TAPS, runtime=runtime), out)
    assert grown.added_to == len(rows) and grown.n_rows == len(rows) + 1


def test_auto_takes_a_graph_runtime_on_the_cpu_only(monkeypatch):
    monkeypatch.delenv("FEATX_RUNTIME", raising=False)
    cpu = torch.device("cpu")
    installed = [r for r in ("onnx", "openvino") if runtime_available(r)]
    assert resolve_runtime("auto", cpu, "fp32") == (installed[0] if installed else "torch")
    assert resolve_runtime("auto", torch.device("cuda"), "bf16") == "torch"
    assert resolve_runtime("auto", cpu, "fp32", compile=True) == "torch"
    with pytest.raises(FeatxError, match="runs on the CPU"):
        resolve_runtime("onnx", torch.device("cuda"), "fp32")
    with pytest.raises(FeatxError, match="computes in fp32"):
        resolve_runtime("openvino", cpu, "bf16")


def test_auto_keeps_a_torch_group_a_cache_hit(images, tmp_path, monkeypatch):
    _graph_runtime("onnx")
    out = tmp_path / "features.h5"
    config = dict(model="test_efficientnet", weights="random", img_size=32, workers=0, progress=False)
    extract(str(images), ExtractConfig(**config, runtime="torch"), out)
    monkeypatch.delenv("FEATX_RUNTIME", raising=False)
    assert extract(str(images), ExtractConfig(**config), out).cache_hit
    assert extract(str(images), ExtractConfig(**config, key="new"), out).n_rows == 9
    with h5py.File(out) as f:
        assert f["new"].attrs["runtime"] in ("onnx", "openvino") and f["test_efficientnet"].attrs["runtime"] == "torch"


def test_a_model_that_fails_to_export_runs_in_torch_with_one_notice(images, tmp_path, monkeypatch, caplog):
    _graph_runtime("onnx")
    import featx.runtimes

    def broken(module, example, path, **kwargs):
        raise featx.runtimes.OnnxExportFailed("UnsupportedOperatorError: aten::made_up")

    monkeypatch.setattr(featx.runtimes, "export_onnx", broken)
    out = tmp_path / "features.h5"
    with caplog.at_level(logging.WARNING, logger="featx"):
        extract(str(images), ExtractConfig(model="test_efficientnet", weights="random", img_size=32, workers=0, progress=False, runtime="onnx"), out)
    notices = [r for r in caplog.records if "could not be run as an ONNX graph" in r.getMessage()]
    assert len(notices) == 1 and "made_up" in notices[0].getMessage()
    with h5py.File(out) as f:
        assert f["test_efficientnet"].attrs["runtime"] == "torch"


def test_cli_refuses_an_unknown_runtime(images, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["extract", str(images), "--model", "test_efficientnet", "--out", str(tmp_path / "f.h5"), "--runtime", "tensorrt"])
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_predict_with_a_graph_runtime_labels_as_torch_does(images, tmp_path, monkeypatch):
    _graph_runtime("onnx")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    import csv

    from featx import FitHeadConfig, PredictConfig, fit_head, predict_images

    extract(str(images), ExtractConfig(**TAPS, runtime="torch"), tmp_path / "features.h5")
    fit_head(tmp_path / "features.h5", FitHeadConfig(head="logreg", device="cpu", progress=False), tmp_path / "head")
    scores = {}
    for runtime in ("torch", "onnx"):
        predict_images(tmp_path / "head", str(images), tmp_path / f"{runtime}.csv", PredictConfig(runtime=runtime, top_k=3, progress=False))
        rows = list(csv.DictReader((tmp_path / f"{runtime}.csv").open()))
        scores[runtime] = ([r["label"] for r in rows], np.array([[float(r["probability"]), float(r["probability_2"])] for r in rows]))
    assert len(list((tmp_path / "cache" / "featx" / "onnx").glob("*.onnx"))) == 1  # predict caches its graph per user
    assert scores["onnx"][0] == scores["torch"][0]
    assert np.abs(scores["onnx"][1] - scores["torch"][1]).max() <= 1e-4
