"""A fine-tuning run folder goes where a head folder goes for images (predict), and evaluate says how to use it."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from timm.data import create_transform

from featx.backbones import create_timm_model
from featx.cli import main
from featx.sources import resolve_source

from conftest import make_image_folder

ARGS = ["--workers", "0", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models gain nothing from intra-op threads; one keeps the tests fast on a shared 2-core CPU."""
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train 3 x 4, test 3 x 2 generated images."""
    root = tmp_path_factory.mktemp("runs") / "images"
    make_image_folder(root, per_class=4, splits=("train",))
    make_image_folder(root, per_class=2, splits=("test",), seed=1000)
    return root


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished 2-epoch fine-tune of test_efficientnet at 32 px."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["finetune", str(data), "--model", "test_efficientnet", "--weights", "random", "--out", str(out), "--epochs", "2",
                 "--batch-size", "8", "--img-size", "32", *ARGS]) == 0
    return out


def _reference(run, data, checkpoint: str) -> tuple[list[str], np.ndarray]:
    """(image paths, softmax of the run's model) computed with timm alone, from run.json and the checkpoint."""
    info = json.loads((run / "run.json").read_text())
    model = create_timm_model(info["config"]["model"], img_size=info["config"]["img_size"], num_classes=len(info["class_names"]))
    model.load_state_dict(torch.load(run / checkpoint, weights_only=True)["model"])
    tf = create_transform(**info["data_config"], is_training=False)
    src = resolve_source(data)
    with torch.inference_mode():
        logits = model.eval()(torch.stack([tf(src.load(i)) for i in range(len(src))]))
    return [str(src.path(i)) for i in range(len(src))], logits.softmax(1).double().numpy()


def _read_csv(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_predict_on_a_run_folder_writes_the_head_folder_csv_with_the_runs_model(run, data, tmp_path, capsys):
    capsys.readouterr()
    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "p.csv"), "--top-k", "2", *ARGS]) == 0
    stdout = capsys.readouterr().out
    header, rows = _read_csv(tmp_path / "p.csv")
    assert header == ["path", "label", "probability", "error", "label_2", "probability_2", "true_label", "split"]
    paths, probs = _reference(run, data, "best.pt")
    names = json.loads((run / "run.json").read_text())["class_names"]
    assert [r["path"] for r in rows] == paths
    top = np.argsort(-probs, axis=1, kind="stable")
    assert [r["label"] for r in rows] == [names[k] for k in top[:, 0]]
    assert [r["label_2"] for r in rows] == [names[k] for k in top[:, 1]]
    assert np.allclose([float(r["probability"]) for r in rows], probs[np.arange(len(rows)), top[:, 0]], atol=1e-5)
    assert {r["split"] for r in rows} == {"train", "test"} and all(r["error"] == "" for r in rows)
    truth = [r["true_label"] for r in rows]
    assert truth == [p.split(os.sep)[-2] for p in paths]
    accuracy = np.mean([names[k] == t for k, t in zip(top[:, 0], truth)])
    assert f"accuracy on the source's labels: {accuracy:.4f}" in stdout


def test_predict_falls_back_to_last_pt_and_names_a_run_without_epochs(run, data, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "best.pt").unlink()
    assert main(["predict", str(copy), str(data), "--out", str(tmp_path / "last.csv"), *ARGS]) == 0
    _, rows = _read_csv(tmp_path / "last.csv")
    _, probs = _reference(run, data, "last.pt")
    names = json.loads((run / "run.json").read_text())["class_names"]
    assert [r["label"] for r in rows] == [names[k] for k in probs.argmax(1)]
    (copy / "last.pt").unlink()
    capsys.readouterr()
    assert main(["predict", str(copy), str(data), "--out", str(tmp_path / "none.csv"), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no finished epoch" in err and "--resume" in err, err
    assert not (tmp_path / "none.csv").exists()


def test_evaluate_on_a_run_folder_says_in_one_line_how_to_score_it(run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(run), str(tmp_path / "features.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("featx evaluate: error:"), err
    assert "scores images, not features" in err
    assert f"featx predict {run} IMAGES" in err
    assert f"--model test_efficientnet --img-size 32 --weights {run / 'best.pt'}" in err and "featx fit-head" in err


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_every_file_of_a_run_and_its_export_has_the_mode_of_a_plainly_created_file(run):
    umask = os.umask(0)
    os.umask(umask)
    files = sorted(p for p in run.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"run.json", "best.pt", "last.pt", "metrics.json", "model.safetensors", "config.json"}
    modes = {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == {name: oct(0o666 & ~umask) for name in modes}


def test_info_describes_a_run_folder(run, capsys):
    assert main(["info", str(run), "--json"]) == 0
    (e,) = json.loads(capsys.readouterr().out)["entries"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert e["model"] == "test_efficientnet" and e["finished"] and e["epochs_done"] == 2 and e["accuracy"] == metrics["accuracy"]
    assert e["weights_sha256"] == json.loads((run / "run.json").read_text())["weights_sha256"] and e["checkpoints"] == ["best.pt", "last.pt"]
    assert main(["info", str(run)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{run}: fine-tuning run folder") and f"test accuracy {e['accuracy']:.3f} (" in text
