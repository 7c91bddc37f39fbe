"""featx: cache frozen timm embeddings in HDF5, fit cheap heads on them, compare with fine-tuning.

The public names below are imported on first use (PEP 562), so ``import featx`` and the
command line's ``--help`` do not pay for torch and timm. ``featx.extract``, ``featx.fit_head``
and ``featx.finetune`` are the workflow functions; their modules are ``featx.extraction``,
``featx.fitting`` and ``featx.finetuning``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__
from .errors import BadImage, FeatxError

# public name -> module that defines it
_EXPORTS = {
    "BackboneInfo": "backbones", "create_backbone": "backbones", "load_weights": "backbones", "read_checkpoint": "backbones",
    "ImageEmbedder": "embedder",
    "ExtractConfig": "configs", "FitHeadConfig": "configs", "FinetuneConfig": "configs", "PredictConfig": "configs",
    "ExtractResult": "extraction", "extract": "extraction", "extract_many": "extraction",
    "FitHeadResult": "fitting", "fit_head": "fitting",
    "EvaluationResult": "evaluation", "evaluate_head": "evaluation",
    "PredictResult": "prediction", "predict_images": "prediction",
    "ExportConfig": "configs", "ExportResult": "exporting", "export_classifier": "exporting",
    "FinetuneResult": "finetuning", "finetune": "finetuning",
    "CompareConfig": "configs", "CompareResult": "comparison", "compare": "comparison",
    "AuditConfig": "configs", "AuditResult": "auditing", "audit": "auditing",
    "LoadedHead": "head_folder", "load_head": "head_folder", "save_head": "head_folder",
    "ImageSource": "sources", "resolve_source": "sources",
    "FeatureSet": "store", "FeatureStore": "store", "load_features": "store", "open_store": "store",
}

__all__ = ["__version__", "BadImage", "FeatxError", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'featx' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .auditing import AuditResult, audit  # noqa: F401
    from .backbones import BackboneInfo, create_backbone, load_weights, read_checkpoint  # noqa: F401
    from .comparison import CompareResult, compare  # noqa: F401
    from .configs import AuditConfig, CompareConfig, ExtractConfig, FinetuneConfig, FitHeadConfig, PredictConfig  # noqa: F401
    from .embedder import ImageEmbedder  # noqa: F401
    from .configs import ExportConfig  # noqa: F401
    from .evaluation import EvaluationResult, evaluate_head  # noqa: F401
    from .exporting import ExportResult, export_classifier  # noqa: F401
    from .extraction import ExtractResult, extract, extract_many  # noqa: F401
    from .finetuning import FinetuneResult, finetune  # noqa: F401
    from .fitting import FitHeadResult, fit_head  # noqa: F401
    from .head_folder import LoadedHead, load_head, save_head  # noqa: F401
    from .prediction import PredictResult, predict_images  # noqa: F401
    from .sources import ImageSource, resolve_source  # noqa: F401
    from .store import FeatureSet, FeatureStore, load_features, open_store  # noqa: F401
