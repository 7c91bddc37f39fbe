"""featx: cache frozen timm embeddings in HDF5, fit cheap heads on them, compare with fine-tuning."""

__version__ = "0.1.0"

from .backbones import BackboneInfo, create_backbone, load_weights, read_checkpoint
from .errors import BadImage, FeatxError
from .extract import ExtractConfig, ExtractResult, extract, iter_embeddings
from .finetune import FinetuneConfig
from .head_io import FitHeadConfig, evaluate_head, fit_head, load_head, predict_images
from .sources import ImageSource, resolve_source
from .store import FeatureSet, FeatureStore, load_features, open_store

__all__ = [
    "__version__",
    "BackboneInfo",
    "create_backbone",
    "load_weights",
    "read_checkpoint",
    "BadImage",
    "FeatxError",
    "ExtractConfig",
    "ExtractResult",
    "extract",
    "iter_embeddings",
    "FinetuneConfig",
    "FitHeadConfig",
    "evaluate_head",
    "fit_head",
    "load_head",
    "predict_images",
    "ImageSource",
    "resolve_source",
    "FeatureSet",
    "FeatureStore",
    "load_features",
    "open_store",
]
