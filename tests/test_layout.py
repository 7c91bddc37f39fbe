"""The code's layout holds: imports run downward through the layers, functions and modules stay small."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "featx"

# Layer of every top-level module or package of featx; a module imports only from lower layers.
LAYERS = {
    "_version": 0, "errors": 0,
    "files": 1, "provenance": 1, "configs": 1, "device": 1, "images": 1, "metrics": 1, "splits": 1, "statistics": 1, "machine": 1,
    "plots": 2, "sources": 2, "preprocess": 2, "backbones": 2, "taps": 2, "runtimes": 2, "store": 2, "heads": 2, "distributed": 2,
    "loading": 3,
    "embedder": 4, "head_folder": 4, "run_folder": 4,
    "extraction": 5, "fitting": 5, "evaluation": 5, "prediction": 5, "finetuning": 5, "exporting": 5, "description": 5,
    "demo": 6, "comparison": 6, "auditing": 6,
    "cli": 7,
    "__main__": 8, "__init__": 8,
}
LAYER_NAMES = ["base", "utilities", "components", "data loading", "composites", "workflows", "suites", "command line", "entry"]


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield rel, rel.parts[0].removesuffix(".py")


def _imported(path: Path, rel: Path) -> set[str]:
    """Top-level featx modules imported anywhere in ``path`` (function-level imports included)."""
    depth = len(rel.parts) - 1  # packages below featx/
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "featx":
                    found.add(parts[1] if len(parts) > 1 else None)
            elif node.level == depth + 1:  # relative to featx itself
                found.add((node.module or "").split(".")[0] or None)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "featx" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_every_module_has_a_layer():
    assert {top for _, top in _modules()} <= set(LAYERS), "add new modules to LAYERS"


@pytest.mark.parametrize("rel, top", list(_modules()), ids=[str(r) for r, _ in _modules()])
def test_imports_only_run_downward(rel, top):
    for name in _imported(PACKAGE / rel, rel):
        if name is None:  # `from . import x` inside featx/__init__ style: only the package itself may
            assert top == "__init__", f"{rel} imports the featx package"
            continue
        if name == top:
            continue  # inside one package
        assert LAYERS[name] < LAYERS[top], (
            f"{rel} ({LAYER_NAMES[LAYERS[top]]}) imports {name} ({LAYER_NAMES[LAYERS[name]]}): layers import downward only")


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_functions_and_modules_stay_small():
    long_functions, long_modules = [], []
    for rel, _ in _modules():
        text = (PACKAGE / rel).read_text()
        if len(text.splitlines()) > 450:
            long_modules.append(f"{rel}: {len(text.splitlines())} lines")
        for fn in _functions(ast.parse(text)):
            n = fn.end_lineno - fn.lineno + 1
            if n > 80:
                long_functions.append(f"{rel}:{fn.lineno} {fn.name}: {n} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def test_workflow_modules_are_modules_and_the_package_exports_the_functions():
    import featx

    for module in ("extraction", "fitting", "evaluation", "prediction", "finetuning", "store", "heads", "embedder"):
        assert type(importlib.import_module(f"featx.{module}")).__name__ == "module"
    import featx.extraction as extraction  # a module, not the function it defines

    assert callable(extraction.extract) and featx.extract is extraction.extract
    assert featx.fit_head.__module__ == "featx.fitting._workflow" and featx.finetune.__module__ == "featx.finetuning._workflow"
    assert set(featx.__all__) <= set(dir(featx))
    for name in featx.__all__:
        assert getattr(featx, name) is not None, name


def test_importing_featx_and_its_command_line_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, featx, featx.cli; featx.cli.build_parser(); print('torch' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_a_featx_checkout_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    """Run from a folder holding a checkout named 'featx' (no __init__.py at its top): the installed package still loads."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user's shell: only the installed featx
    (tmp_path / "featx" / "tests").mkdir(parents=True)
    (tmp_path / "featx" / "README.md").write_text("a checkout\n")
    code = "import featx; print(featx.__version__, callable(featx.extract))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.split()[1] == "True", out.stderr
    cli = subprocess.run([sys.executable, "-m", "featx", "--version"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert cli.returncode == 0 and cli.stdout.startswith("featx "), cli.stderr
