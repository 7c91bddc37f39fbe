"""Runtimes that compute a backbone's forward pass: torch itself, or the exported graph in ONNX Runtime or OpenVINO (CPU).

The embedder hands a runtime a torch module (backbone, taps and flip averaging); ``torch`` calls it, ``onnx`` and
``openvino`` export it once with ``torch.onnx.export`` and run the graph, several times faster than eager torch on a
CPU (``benchmarks/RESULTS.md``, ``extract_runtimes``). The graph is exported with the TorchScript exporter
(``dynamo=False``): it needs only the ``onnx`` package, works offline, and exported every timm model tried here in
about half the time of the ``torch.export`` path (which also needs ``onnxscript``). ``pip install 'featx[onnx]'``
adds ONNX Runtime, ``'featx[openvino]'`` OpenVINO.
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

__all__ = ["RUNTIMES", "GRAPH_RUNTIMES", "ONNX_OPSET", "runtime_available", "onnx_available", "resolve_runtime", "graph_usable", "export_onnx",
           "cached_onnx", "default_cache_dir", "graph_forward", "OnnxForward", "OpenVinoForward", "OnnxExportFailed"]

_logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx", "openvino")
# Runtimes of the exported graph -> the packages they need, and the extra that installs them.
GRAPH_RUNTIMES = {"onnx": (("onnxruntime", "onnx"), "onnx"), "openvino": (("openvino", "onnx"), "openvino")}
# 'auto' on the CPU takes the first one installed. OpenVINO's pure forward of Lite0 was faster than ONNX Runtime's, but
# inside featx extract it was slower (benchmarks/RESULTS.md, extract_runtimes), so ONNX Runtime comes first.
AUTO_ORDER = ("onnx", "openvino")
ONNX_OPSET = 17  # understood by ONNX Runtime >= 1.14 and OpenVINO
# The runtime 'auto' stands for, when set (the test suite sets torch: an export per tiny test store costs seconds).
ENV_RUNTIME = "FEATX_RUNTIME"


class OnnxExportFailed(Exception):
    """The model could not be exported to ONNX or the graph does not load (the caller falls back to torch)."""


def runtime_available(runtime: str) -> bool:
    """True for torch, and for a graph runtime whose packages (its own and ``onnx``, the exporter's) are installed."""
    import importlib.util

    if runtime == "torch":
        return True
    return all(importlib.util.find_spec(m) is not None for m in GRAPH_RUNTIMES[runtime][0])


def onnx_available() -> bool:
    """True when ONNX Runtime and the ``onnx`` package are installed."""
    return runtime_available("onnx")


def graph_usable(device: torch.device, precision: str, compile: bool = False) -> bool:
    """Whether an exported graph can compute what torch would here: on the CPU, in fp32, without torch.compile."""
    return device.type == "cpu" and precision in ("fp32", "auto") and not compile


def resolve_runtime(runtime: str, device: torch.device, precision: str, compile: bool = False) -> str:
    """``auto``: on the CPU in fp32, OpenVINO or else ONNX Runtime when installed; torch otherwise (GPU, bf16/fp16,
    --compile, neither installed). An explicit graph runtime that cannot run here is refused with the fix.
    """
    if runtime not in RUNTIMES:
        raise FeatxError(f"unknown --runtime '{runtime}'; use {', '.join(RUNTIMES)}")
    if runtime == "auto":
        preferred = os.environ.get(ENV_RUNTIME)
        order = (preferred,) if preferred in RUNTIMES[1:] else AUTO_ORDER
        if not graph_usable(device, precision, compile):
            return "torch"
        return next((r for r in order if runtime_available(r)), "torch")
    if runtime in GRAPH_RUNTIMES:
        if device.type != "cpu":
            raise FeatxError(f"--runtime {runtime} runs on the CPU; use --device cpu, or --runtime torch on {device}")
        if precision != "fp32":
            raise FeatxError(f"--runtime {runtime} computes in fp32; drop --precision {precision} or use --runtime torch")
        if compile:
            raise FeatxError("--compile is torch.compile; use it with --runtime torch")
        if not runtime_available(runtime):
            packages, extra = GRAPH_RUNTIMES[runtime]
            raise FeatxError(f"--runtime {runtime} needs {' and '.join(packages)}: pip install 'featx[{extra}]'")
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
        raise OnnxExportFailed(f"{type(e).__name__}: {_first_line(e)}") from e
    return path


def graph_digest(identity: dict) -> str:
    """Hash of what determines an exported graph (the store key's fields that shape the forward, exporter versions)."""
    from importlib.metadata import version

    stamp = {**identity, "torch": torch.__version__, "onnx": version("onnx"), "opset": ONNX_OPSET}
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


def graph_forward(runtime: str, path: str | os.PathLike):
    """The exported graph at ``path`` loaded in ``runtime`` (onnx or openvino), as a callable on float32 image tensors."""
    return OpenVinoForward(path) if runtime == "openvino" else OnnxForward(path)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


class OnnxForward:
    """An exported graph run by ONNX Runtime on the CPU: float32 images [n, 3, H, W] in, its first output out."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        if hasattr(ort, "disable_telemetry_events"):
            ort.disable_telemetry_events()  # featx sends nothing anywhere (ONNX Runtime keeps a usage database in ~/.cache/Microsoft)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # no busy-waiting between operators: on a shared CPU it took 20% off (11.3 vs 13.9 images/s, Lite0, load 12 on 2 cores)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise OnnxExportFailed(f"ONNX Runtime cannot load the graph: {_first_line(e)}") from e
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run([self.output_name], {self.input_name: array})[0])


class OpenVinoForward:
    """An exported graph compiled by OpenVINO for the CPU, in fp32 (never its bf16 default on CPUs that have bf16)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import openvino as ov

        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
                                                                       "INFERENCE_PRECISION_HINT": "f32"})
        except Exception as e:
            raise OnnxExportFailed(f"OpenVINO cannot compile the graph: {_first_line(e)}") from e
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(np.array(self.request.infer([array])[0]))
