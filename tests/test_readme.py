"""The README's code runs as written, and CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

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
