"""What produced a result: the same library versions and time stamp, recorded next to every output."""

from __future__ import annotations

import hashlib
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from ._version import __version__

__all__ = ["provenance", "utc_now", "code_versions"]

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


# The code that turns a backbone's options into its features and their key: featx's own source and these libraries.
_FEATURE_LIBRARIES = ("timm", "torch", "torchvision")
_CODE: dict[str, str] = {}


def code_versions() -> dict[str, str]:
    """``{'featx': sha256 of featx's own source files, 'timm': version, 'torch': ..., 'torchvision': ...}``, read
    without importing any of them (package metadata): what a cached result's validity depends on besides its inputs.

    featx's source is hashed rather than versioned, so a development checkout whose code changed is never taken
    for the one that wrote a store.
    """
    if not _CODE:
        h = hashlib.sha256()
        package = Path(__file__).resolve().parent
        for path in sorted(package.rglob("*.py")):
            h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        _CODE["featx"] = h.hexdigest()
        for name in _FEATURE_LIBRARIES:
            try:
                _CODE[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                _CODE[name] = ""
    return dict(_CODE)
