"""The files of an export folder: ``model.onnx``, timm's ``model.safetensors`` + ``config.json``, ``preprocess.json``,
``labels.txt`` and ``featx.json`` (what was exported, from what)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..embedder import ImageEmbedder
from ..errors import FeatxError
from ..files import jsonable, write_json_atomic, write_text_atomic
from ..runtimes import OnnxExportFailed, OnnxForward, export_onnx
from ._network import ExportedClassifier

__all__ = ["ONNX_FILE", "OUTPUTS", "write_onnx", "write_timm", "timm_with_head", "write_preprocess", "write_labels", "preprocess_spec", "describe"]

ONNX_FILE = "model.onnx"
OUTPUTS = ("probabilities", "features")
ONNX_TOLERANCE = 1e-4  # largest difference of a probability between the graph and the torch module it came from


def write_onnx(classifier: ExportedClassifier, input_size: tuple[int, int, int], folder: Path) -> Path:
    """``model.onnx`` (dynamic batch; input ``images``, outputs ``probabilities`` and ``features``), checked against torch."""
    example = torch.zeros(2, *input_size)
    try:
        path = export_onnx(classifier.eval(), example, folder / ONNX_FILE, output_names=OUTPUTS)
        graph = OnnxForward(path)
    except OnnxExportFailed as e:
        raise FeatxError(f"torch cannot export this model to ONNX ({e}); use --format timm") from None
    x = torch.randn(3, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = classifier(x)[0]
    gap = float((graph(x) - expected).abs().max())
    assert gap <= ONNX_TOLERANCE, f"the exported graph's probabilities differ from torch's by {gap:.2e}"
    return path


def write_timm(model: torch.nn.Module, class_names: list[str], data_config: dict, folder: Path) -> None:
    """timm's ``config.json`` + ``model.safetensors`` of ``model`` (its classifier in place): loads with
    ``timm.create_model('local-dir:FOLDER', pretrained=True)``."""
    from timm.models import save_for_hf

    config = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in data_config}
    save_for_hf(model.eval(), str(folder), model_config={"label_names": list(class_names)}, safe_serialization=True,
                data_config=config)


def timm_with_head(embedder: ImageEmbedder, linear: torch.nn.Linear) -> torch.nn.Module:
    """The embedder's timm model with ``linear`` as its classifier (a plain linear head on the pooled pre-logits)."""
    from ..backbones import create_timm_model

    model = create_timm_model(embedder.model, img_size=embedder.img_size, num_classes=linear.out_features)
    missing, unexpected = model.load_state_dict(embedder.model_.state_dict(), strict=False)
    classifier = model.get_classifier()
    own = {name for name, p in model.named_parameters() if any(p is q for q in classifier.parameters())}
    assert not unexpected and set(missing) == own, f"timm's classifier is not the only new part: {missing} {unexpected}"
    with torch.no_grad():
        classifier.weight.copy_(linear.weight)
        classifier.bias.copy_(linear.bias)
    return model


def preprocess_spec(embedder: ImageEmbedder) -> dict:
    """How images become the model's input, from timm's data config: resize (shortest side), centre crop, mean/std."""
    g, dc = embedder.geometry_, embedder.data_config_
    spec = {"input": "images", "outputs": list(OUTPUTS), "layout": "float32 [batch, 3, height, width], RGB, (pixel / 255 - mean) / std"}
    if g is not None:
        spec.update(resize=g.resize, crop=list(g.crop), interpolation=g.interpolation, mean=list(g.mean), std=list(g.std))
    else:
        spec.update(resize=None, crop=None, note=f"this model's transform is not resize + centre crop: {embedder.transform_}")
    spec["input_size"] = list(dc["input_size"])
    spec["data_config"] = jsonable(dc)
    return spec


def write_preprocess(embedder: ImageEmbedder, folder: Path) -> None:
    write_json_atomic(folder / "preprocess.json", preprocess_spec(embedder))


def write_labels(class_names: list[str], folder: Path) -> None:
    """One class name per line, in the order of the model's outputs."""
    bad = [c for c in class_names if "\n" in c or "\r" in c]
    if bad:
        raise FeatxError(f"class name {bad[0]!r} holds a line break; labels.txt has one name per line")
    write_text_atomic(folder / "labels.txt", "".join(f"{c}\n" for c in class_names))


def describe(folder: Path, meta: dict) -> None:
    """``featx.json``: what was exported, from what, and what the outputs mean."""
    write_json_atomic(folder / "featx.json", meta)

