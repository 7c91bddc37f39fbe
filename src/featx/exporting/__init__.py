"""``featx export``: a fitted head with its backbone, or a fine-tuning run, as one file that takes normalised images and
returns class probabilities, runnable without featx.

``_network`` builds the classifier as one torch module (backbone, taps and flip averaging, the head folded into a few
layers; kNN and RBF SVM are refused), ``_formats`` writes ``model.onnx``, timm's ``model.safetensors`` + ``config.json``,
``preprocess.json`` and ``labels.txt``, ``_workflow`` checks the inputs and writes the folder atomically.
"""

from ..configs import ExportConfig
from ._network import EXPORTABLE_HEADS
from ._workflow import FORMATS, ExportResult, export_classifier

__all__ = ["ExportConfig", "ExportResult", "export_classifier", "EXPORTABLE_HEADS", "FORMATS"]
