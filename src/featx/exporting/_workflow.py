"""``featx export``: a head folder (with its backbone) or a fine-tuning run as files that run without featx."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..configs import ExportConfig
from ..embedder import ImageEmbedder, head_embedder, run_embedder
from ..errors import FeatxError
from ..files import replace_folder
from ..head_folder import load_head
from ..provenance import provenance
from ..run_folder import is_run_folder, load_run
from ..runtimes import onnx_available
from ._formats import OUTPUTS, describe, timm_with_head, write_labels, write_onnx, write_preprocess, write_timm
from ._network import ExportedClassifier, head_network, plain_linear

__all__ = ["ExportResult", "export_classifier", "FORMATS"]

_logger = logging.getLogger(__name__)

FORMATS = ("onnx", "timm")


@dataclass
class ExportResult:
    """What ``export_classifier`` wrote."""

    out: Path
    formats: list[str]
    what: str  # 'head <name>' or 'fine-tuning run'
    n_classes: int
    files: list[str]
    seconds: float
    not_written: dict = field(default_factory=dict)  # format -> why it was left out

    def to_dict(self) -> dict:
        return {**asdict(self), "out": str(self.out)}

    def summary(self) -> str:
        text = (f"Exported the {self.what} ({self.n_classes} classes) as {' and '.join(self.formats)} into {self.out}: "
                f"{', '.join(self.files)}")
        for fmt, why in self.not_written.items():
            text += f"; no {fmt} files: {why}"
        return text + "."


@dataclass
class _Target:
    """What gets exported: the embedder, the head as a network, and how to describe it."""

    embedder: ImageEmbedder
    classifier: ExportedClassifier
    class_names: list[str]
    what: str
    timm_model: torch.nn.Module | None  # the timm model with the head as its classifier; None when timm's cannot hold it
    timm_reason: str  # why not, when timm_model is None
    meta: dict


def export_classifier(path: str | os.PathLike, out: str | os.PathLike, config: ExportConfig | None = None) -> ExportResult:
    """Write the classifier of ``path`` (a head folder of ``featx fit-head`` or a run folder of ``featx finetune``) to the
    new folder ``out``: ``model.onnx`` (images in, class probabilities and features out) and/or timm's
    ``model.safetensors`` + ``config.json``, with ``preprocess.json``, ``labels.txt`` and ``featx.json``.

    The folder is written beside ``out`` under a temporary name and renamed into place when complete.
    """
    config = config or ExportConfig()
    t0 = time.perf_counter()
    out = Path(out)
    formats = _formats(config.formats)
    _check_out(out, config.overwrite)
    target = _run_target(path, config) if is_run_folder(path) else _head_target(path, config)
    not_written = {}
    if "timm" in formats and target.timm_model is None:
        if config.formats:
            raise FeatxError(f"--format timm holds timm's own classifier, one linear layer on the pooled features, and {target.timm_reason}; "
                             "use --format onnx")
        formats.remove("timm")
        not_written["timm"] = target.timm_reason
        _logger.warning("no timm checkpoint: %s (the ONNX model holds all of it)", target.timm_reason)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write(target, formats, tmp)
        files = sorted(p.name for p in tmp.iterdir())
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out=out, formats=formats, what=target.what, n_classes=len(target.class_names), files=files,
                        seconds=time.perf_counter() - t0, not_written=not_written)


def _formats(spec: str | None) -> list[str]:
    names = [f.strip() for f in (spec or ",".join(FORMATS)).split(",") if f.strip()]
    unknown = [f for f in names if f not in FORMATS]
    if unknown or not names:
        raise FeatxError(f"unknown --format '{','.join(unknown) or spec}'; use onnx, timm or onnx,timm")
    if "onnx" in names and not onnx_available():
        raise FeatxError("--format onnx needs the onnx package (and onnxruntime to check the graph): pip install 'featx[onnx]'")
    return list(dict.fromkeys(names))


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FeatxError(f"--out '{out}' is a file; choose a folder for the export")
    if out.exists() and not overwrite:
        raise FeatxError(f"--out '{out}' exists; pass --overwrite to replace it, or choose a new folder")


def _write(target: _Target, formats: list[str], folder: Path) -> None:
    if "onnx" in formats:
        write_onnx(target.classifier, tuple(target.embedder.data_config_["input_size"]), folder)
    if "timm" in formats:
        write_timm(target.timm_model, target.class_names, target.embedder.data_config_, folder)
    write_preprocess(target.embedder, folder)
    write_labels(target.class_names, folder)
    describe(folder, {**target.meta, "formats": formats, "outputs": list(OUTPUTS), **provenance()})


def _head_target(path, config: ExportConfig) -> _Target:
    head = load_head(path)
    bb, name = head.meta.get("backbone"), head.meta.get("head", head.meta.get("estimator", "?"))
    if not isinstance(bb, dict) or not bb.get("model"):
        raise FeatxError(f"head '{path}' records no backbone (a head of another store layout); refit it with featx fit-head on a store of this featx")
    network = head_network(head.pipeline, name, len(head.class_names))
    embedder = head_embedder(head, device="cpu", weights=config.weights, runtime="torch")
    dim = int(head.meta["feature_dim"])
    if embedder.num_features_ != dim:
        raise FeatxError(f"head '{path}' was fitted on {dim}-dimensional features, but its backbone record (layers "
                         f"'{bb.get('layers') or 'last'}') rebuilds {embedder.num_features_}-dimensional ones: the head comes from "
                         "another store layout; refit it on features extracted by this featx")
    float16 = bb.get("dtype") == "float16"
    linear, reason = plain_linear(network), ""
    if linear is None:
        reason = f"head '{name}' " + ("is an MLP" if name == "mlp" else "L2-normalises its features first")
    elif [t.name for t in embedder.taps_] != ["last"] or embedder.tta:
        reason, linear = f"the features are taps '{bb.get('layers')}' / flip '{bb.get('tta') or 'none'}' of the backbone", None
    elif float16:
        reason, linear = "the head was fitted on float16 features", None
    meta = {"format": "featx-export/1", "exported": str(path), "kind": "head", "head": name, "class_names": head.class_names,
            "probabilities": _probability_note(head.pipeline), "backbone": bb}
    return _Target(embedder, ExportedClassifier(embedder.embedding_net(), network, float16_features=float16), head.class_names,
                   f"head '{name}'", None if linear is None else timm_with_head(embedder, linear), reason, meta)


def _run_target(path, config: ExportConfig) -> _Target:
    run = load_run(path, config.weights)
    embedder = run_embedder(run, device="cpu", runtime="torch")
    meta = {"format": "featx-export/1", "exported": str(path), "kind": "run", "checkpoint": str(run.checkpoint),
            "class_names": run.class_names, "probabilities": "softmax of the fine-tuned model's logits; 'features' are the logits",
            "run": run.meta.get("config")}
    model = embedder.model_.eval()
    return _Target(embedder, ExportedClassifier(model, torch.nn.Identity()), run.class_names, "fine-tuning run", model, "", meta)


def _probability_note(pipeline) -> str:
    final = pipeline.steps[-1][1]
    if hasattr(final, "predict_proba"):
        return "the head's own class probabilities (predict_proba)"
    return "softmax of the head's decision function (it has no probabilities): an uncalibrated confidence, as featx predict prints"
