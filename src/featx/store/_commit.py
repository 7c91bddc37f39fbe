"""Putting a finished group into the store atomically, and checking a store path before any work."""

from __future__ import annotations

import os
from pathlib import Path

import h5py

from ..errors import FeatxError
from ._reader import attr_value

__all__ = ["commit_group", "check_store_path", "group_attrs"]


def check_store_path(out: Path) -> None:
    """Refuse an ``--out`` that is not a store, or that cannot be written, before any work is done."""
    if out.exists() and (out.is_dir() or not h5py.is_hdf5(out)):
        raise FeatxError(f"--out '{out}' exists and is not an HDF5 feature store; choose another path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FeatxError(f"cannot write --out '{out}': folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise FeatxError(f"cannot write --out '{out}': permission denied")


def group_attrs(out: Path, key: str) -> dict | None:
    """Attributes of group ``key`` in the store ``out``; None when there is no such store or group."""
    if not out.exists():
        return None
    try:
        with h5py.File(out, "r") as f:
            if key not in f:
                return None
            return {k: attr_value(v) for k, v in f[key].attrs.items()}
    except OSError as e:
        raise FeatxError(f"cannot read existing store '{out}': {e}") from None


def commit_group(journal: Path, out: Path, key: str, *, overwrite: bool = False) -> None:
    """Put ``journal``'s group ``key`` into ``out`` by writing a new file and renaming it over ``out``."""
    if not out.exists():
        os.replace(journal, out)
        return
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(out, "r") as src_store, h5py.File(journal, "r") as src_new, h5py.File(tmp, "w") as dst:
            for k in src_store:
                if k == key:
                    if not overwrite:
                        raise FeatxError(f"'{out}' already holds a group '{key}'; pass --overwrite to replace it or --key to add another")
                    continue
                src_store.copy(src_store[k], dst, name=k)
            for k, v in src_store.attrs.items():
                dst.attrs[k] = v
            src_new.copy(src_new[key], dst, name=key)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    journal.unlink()
