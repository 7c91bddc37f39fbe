"""What produced a result: the same library versions and time stamp, recorded next to every output."""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from importlib import metadata

from ._version import __version__

__all__ = ["provenance", "utc_now"]

_LIBRARIES = ("torch", "torchvision", "timm", "numpy", "scikit-learn", "h5py")


def _library_version(name: str) -> str:
    module = {"scikit-learn": "sklearn"}.get(name, name)
    loaded = sys.modules.get(module)  # the imported module's own version (torch's includes its build, e.g. +cu130)
    if loaded is not None and hasattr(loaded, "__version__"):
        return str(loaded.__version__)
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance() -> dict[str, str]:
    """``featx_version``, ``python_version``, ``<library>_version`` of torch, torchvision, timm, numpy,
    scikit-learn and h5py, and ``created`` (UTC): flat string values, so they fit HDF5 attributes too."""
    versions = {"featx_version": __version__, "python_version": platform.python_version()}
    versions.update({f"{name.replace('-', '_')}_version": _library_version(name) for name in _LIBRARIES})
    return {**versions, "created": utc_now()}
