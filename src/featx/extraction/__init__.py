"""``featx extract``: frozen backbones over an image source, rows into the feature store.

:func:`extract` runs one backbone, :func:`extract_many` several in one decode pass; both run
across the ranks of a torchrun job when launched by one. The steps: the checks and cache hits
decided before torch is imported in :mod:`._cached`, plan per backbone (cache hit, all images,
or only images added since) in :mod:`._plan`, embed into journals and commit in :mod:`._workflow`,
report in :mod:`._result`. The workflow functions are imported on first use, so the command line
answers mistakes and cache hits without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..configs import ExtractConfig
from ._cached import KEY_OPTIONS, cache_hits, check_extraction, key_request
from ._result import ExtractResult, skip_digest

__all__ = ["ExtractConfig", "ExtractResult", "extract", "extract_many", "skip_digest", "check_extraction", "cache_hits",
           "key_request", "KEY_OPTIONS"]


def __getattr__(name: str):
    if name in ("extract", "extract_many"):
        from . import _workflow

        value = getattr(_workflow, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'featx.extraction' has no attribute '{name}'")


if TYPE_CHECKING:
    from ._workflow import extract, extract_many  # noqa: F401
