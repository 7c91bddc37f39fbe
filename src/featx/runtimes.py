"""Runtimes that compute a backbone's forward pass: torch itself, or ONNX Runtime on the CPU.

The embedder hands a runtime a torch module (backbone, taps and flip averaging); ``torch`` calls it,
``onnx`` exports it once with ``torch.onnx.export`` and runs the graph with ONNX Runtime, which is
several times faster than eager torch on a CPU (``benchmarks/RESULTS.md``, ``runtimes``). The
graph is exported with the TorchScript exporter (``dynamo=False``): it needs only the ``onnx``
package, works offline, and exported every timm model tried here in about half the time of the
``torch.export`` path (which also needs ``onnxscript``). ``pip install featx[onnx]`` adds what it needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import FeatxError
from .files import atomic_path, safe_name

__all__ = ["RUNTIMES", "ONNX_OPSET", "onnx_available", "resolve_runtime", "export_onnx", "cached_onnx", "default_cache_dir",
           "OnnxForward", "OnnxExportFailed"]

_logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx")
ONNX_OPSET = 17  # understood by ONNX Runtime >= 1.14 and OpenVINO
# Set to torch or onnx, the runtime 'auto' stands for (the test suite sets torch: an export per tiny test store costs seconds).
ENV_RUNTIME = "FEATX_RUNTIME"


class OnnxExportFailed(Exception):
    """The model could not be exported to ONNX or the graph does not load (the caller falls back to torch)."""


def onnx_available() -> bool:
    """True when ONNX Runtime and the ``onnx`` package (the exporter's) are installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def resolve_runtime(runtime: str, device: torch.device, precision: str, compile: bool = False) -> str:
    """``auto``: onnx on the CPU in fp32 when ONNX Runtime is installed, torch otherwise (GPU, bf16/fp16, --compile).

    An explicit ``onnx`` that cannot run here is refused with the fix.
    """
    if runtime not in RUNTIMES:
        raise FeatxError(f"unknown --runtime '{runtime}'; use {', '.join(RUNTIMES)}")
    if runtime == "auto":
        preferred = os.environ.get(ENV_RUNTIME, "onnx")
        usable = device.type == "cpu" and precision == "fp32" and not compile and onnx_available()
        return "onnx" if preferred == "onnx" and usable else "torch"
    if runtime == "onnx":
        if device.type != "cpu":
            raise FeatxError(f"--runtime onnx runs on the CPU; use --device cpu, or --runtime torch on {device}")
        if precision != "fp32":
            raise FeatxError(f"--runtime onnx computes in fp32; drop --precision {precision} or use --runtime torch")
        if compile:
            raise FeatxError("--compile is torch.compile; use it with --runtime torch")
        if not onnx_available():
            raise FeatxError("--runtime onnx needs ONNX Runtime: pip install 'featx[onnx]' (onnxruntime and onnx)")
    return runtime


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike, *, input_name: str = "images",
                output_names: tuple[str, ...] = ("features",)) -> Path:
    """Export ``module`` (eval mode, float32) to ``path`` with a dynamic batch dimension; written atomically.

    Raises :class:`OnnxExportFailed` when torch cannot export it.
    """
    path = Path(path)
    axes = {name: {0: "batch"} for name in (input_name, *output_names)}
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(module.eval(), (example,), str(tmp), dynamo=False, input_names=[input_name],
                              output_names=list(output_names), dynamic_axes=axes, opset_version=ONNX_OPSET)
    except Exception as e:  # the exporter raises many types (tracing, unsupported operators, missing onnx)
        raise OnnxExportFailed(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from e
    return path


def graph_digest(identity: dict) -> str:
    """Hash of what determines an exported graph (the store key's fields that shape the forward, exporter versions)."""
    import onnx

    stamp = {**identity, "torch": torch.__version__, "onnx": onnx.__version__, "opset": ONNX_OPSET}
    return hashlib.sha256(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """Where graphs exported outside a store go (``featx predict``): ``$XDG_CACHE_HOME/featx/onnx`` or ``~/.cache/featx/onnx``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featx" / "onnx"


def cached_onnx(module: torch.nn.Module, example: torch.Tensor, folder: str | os.PathLike, name: str, identity: dict) -> Path:
    """``folder/<name>-<digest>.onnx``, exported from ``module`` unless already there; older graphs of ``name`` are removed.

    The digest covers ``identity`` (model, weights hash, input size, taps, flip ...), so a graph is reused only for
    the same forward pass.
    """
    folder = Path(folder)
    path = folder / f"{safe_name(name)}-{graph_digest(identity)}.onnx"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    _logger.info("exporting %s to ONNX (once; cached in %s)", name, folder)
    export_onnx(module, example, path)
    for old in folder.glob(f"{safe_name(name)}-*.onnx"):
        if old != path and len(old.stem) == len(path.stem):
            old.unlink(missing_ok=True)
    return path


class OnnxForward:
    """An exported graph run by ONNX Runtime on the CPU: float32 images [n, 3, H, W] in, its first output out."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise OnnxExportFailed(f"ONNX Runtime cannot load the graph: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from e
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run([self.output_name], {self.input_name: array})[0])
