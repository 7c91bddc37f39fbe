"""``featx extract``: frozen backbones over an image source, rows into the feature store.

:func:`extract` runs one backbone, :func:`extract_many` several in one decode pass; both run
across the ranks of a torchrun job when launched by one. The steps: plan per backbone (cache
hit, all images, or only images added since) in :mod:`._plan`, embed into journals and commit
in :mod:`._workflow`, report in :mod:`._result`.
"""

from ..configs import ExtractConfig
from ._result import ExtractResult, skip_digest
from ._workflow import extract, extract_many

__all__ = ["ExtractConfig", "ExtractResult", "extract", "extract_many", "skip_digest"]
