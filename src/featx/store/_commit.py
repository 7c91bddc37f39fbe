"""Putting finished journals into the store as a group, and checking a store path before any work."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import FeatxError
from ._layout import Link, StoreCommit, fsync_file
from ._reader import attr_value

__all__ = ["commit_group", "commit_parts", "check_store_path", "group_attrs", "group_feature_dim", "ImageList"]

_STR = h5py.string_dtype("utf-8")
# Row columns besides the features, written out in a head file; the last two only when every part has them.
_COLUMNS = ("labels", "ids", "split", "index", "digest", "stamp")
_SKIP_COLUMNS = ("ids", "index", "reasons", "stamp")


@dataclass
class ImageList:
    """The image list a group is assembled for: what each stored row's label, split code and position become."""

    ids: list[str]
    labels: np.ndarray  # int64 per image
    split_codes: np.ndarray  # int8 per image, into the group's split_names


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
    except (OSError, KeyError) as e:
        raise FeatxError(f"cannot read existing store '{out}': {e}") from None


def group_feature_dim(out: Path, key: str) -> int | None:
    """Width of group ``key``'s features in the store ``out`` (read from the dataset's shape, no rows); None without one."""
    try:
        with h5py.File(out, "r") as f:
            features = f.get(f"{key}/features")
            return int(features.shape[1]) if features is not None and len(features.shape) == 2 else None
    except (OSError, KeyError):
        return None


def commit_group(journal: Path, out: Path, key: str, *, overwrite: bool = False) -> None:
    """Make the finished ``journal`` group ``key`` of the store ``out`` (see :func:`commit_parts`)."""
    commit_parts(out, key, [journal], overwrite=overwrite)


def commit_parts(out: Path, key: str, journals: list[Path], *, attrs: dict | None = None, overwrite: bool = False,
                 extend: bool = False, image_list: ImageList | None = None) -> None:
    """Make group ``key`` of ``out`` hold the rows of the finished ``journals``, in order (after its present rows with ``extend``).

    One journal and nothing to extend: the journal file becomes the group as it is (in a new store:
    the store itself, a single file). Otherwise a
    small head file joins the parts: ``features`` as a virtual dataset over the parts' rows (no
    copy), the other row columns written out, with each row's label, split code and position taken
    from ``image_list`` by its id when given, and ``attrs`` over the last journal's attributes.
    The journals are moved into the store; nothing already in it is rewritten.
    """
    out = Path(out)
    if not out.exists() and len(journals) == 1 and not (attrs or extend or image_list is not None) and _first_group(journals[0], out):
        return
    with StoreCommit(out) as commit:
        if key in commit.links and not (overwrite or extend):
            raise FeatxError(f"'{out}' already holds a group '{key}'; pass --overwrite to replace it or --key to add another")
        old = commit.parts(key) if extend and key in commit.links else []
        new = []
        for journal in journals:
            with h5py.File(journal, "r") as f:
                rows, skips = int(f[key]["features"].shape[0]), int(f[key]["skipped"]["ids"].shape[0])
            if rows + skips == 0 and len(journals) > 1:  # a rank whose share was empty
                journal.unlink()
                continue
            new.append((commit.add_file(journal, key), "/" + key, rows))
        parts = old + new
        if len(parts) == 1 and not attrs and image_list is None:
            link = Link(parts[0][0], parts[0][1])
        else:
            link = _write_head(commit, key, parts, attrs or {}, image_list)
        commit.publish(key, link)


def _first_group(journal: Path, out: Path) -> bool:
    """Make ``journal`` the new store ``out`` (a single file, as in featx 0.1), unless another commit created it first."""
    fsync_file(journal)
    try:
        os.link(journal, out)  # fails if ``out`` appeared meanwhile, where a rename would replace it
    except FileExistsError:
        return False
    except OSError:  # no hard links here
        os.replace(journal, out)
        return True
    journal.unlink()
    return True


def _read_parts(folder: Path, parts: list[tuple[str, str, int]]):
    """Row columns, skipped columns and the last part's attributes, concatenated over ``parts``."""
    cols: dict[str, list] = {c: [] for c in _COLUMNS}
    skips: dict[str, list] = {c: [] for c in _SKIP_COLUMNS}
    attrs, dim, dtype = {}, None, None
    for file, path, rows in parts:
        with h5py.File(folder / file, "r") as f:
            g = f[path]
            dim, dtype = g["features"].shape[1], g["features"].dtype
            for c in _COLUMNS:
                cols[c].append(g[c][:rows] if c in g else None)
            for c in _SKIP_COLUMNS:
                skips[c].append(g["skipped"][c][:] if c in g["skipped"] else None)
            attrs = {k: attr_value(v) for k, v in g.attrs.items() if k not in ("progress_sha256", "next_image")}
    join = {c: (np.concatenate(v) if all(x is not None for x in v) else None) for c, v in cols.items()}
    skipped = {c: (np.concatenate(v) if all(x is not None for x in v) else None) for c, v in skips.items()}
    return join, skipped, attrs, dim, dtype


def _write_head(commit: StoreCommit, key: str, parts: list[tuple[str, str, int]], attrs: dict, image_list: ImageList | None) -> Link:
    cols, skipped, last_attrs, dim, dtype = _read_parts(commit.dir, parts)
    ids, skip_ids = _text(cols["ids"]), _text(skipped["ids"])
    skipped["reasons"] = _text(skipped["reasons"])
    if image_list is not None:
        pos = {image_id: i for i, image_id in enumerate(image_list.ids)}
        index = np.array([pos[i] for i in ids], dtype=np.int64)
        cols.update(labels=image_list.labels[index], split=image_list.split_codes[index], index=index)
        skipped["index"] = np.array([pos[i] for i in skip_ids], dtype=np.int64)
    n = len(ids)
    name = commit.new_file(key, "head")
    with h5py.File(commit.dir / name, "w") as f:
        g = f.create_group(key)
        layout = h5py.VirtualLayout(shape=(n, dim), dtype=dtype)
        row = 0
        for file, path, rows in parts:
            layout[row: row + rows] = h5py.VirtualSource(file, f"{path}/features", shape=(rows, dim), dtype=dtype)
            row += rows
        g.create_virtual_dataset("features", layout)
        for c in _COLUMNS:
            if cols[c] is not None:
                g.create_dataset(c, data=ids if c == "ids" else cols[c], dtype=_STR if c == "ids" else cols[c].dtype)
        s = g.create_group("skipped")
        for c in _SKIP_COLUMNS:
            if skipped[c] is not None:
                values = skip_ids if c == "ids" else skipped[c]
                s.create_dataset(c, data=values, dtype=_STR if c in ("ids", "reasons") else values.dtype)
        g.attrs.update({**last_attrs, **attrs, "n_rows": n, "n_skipped": len(skip_ids), "complete": True,
                        "parts": json.dumps([list(p) for p in parts])})
    return Link(name, "/" + key)


def _text(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]
