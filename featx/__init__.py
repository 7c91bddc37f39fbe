"""featx: cache frozen timm embeddings in HDF5, fit cheap heads on them, compare with fine-tuning."""

__version__ = "0.1.0"

from .backbones import BackboneInfo, create_backbone, load_weights, read_checkpoint
from .errors import BadImage, FeatxError
from .extract import ExtractConfig, ExtractResult, extract
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
    "ImageSource",
    "resolve_source",
    "FeatureSet",
    "FeatureStore",
    "load_features",
    "open_store",
]
