"""Reading a feature store: groups, splits, rows (only the rows asked for are read from disk)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import h5py
import numpy as np

from ..errors import FeatxError

_logger = logging.getLogger(__name__)

__all__ = ["StoreKey", "FeatureSet", "FeatureStore", "open_store", "load_features", "read_skipped", "attr_value"]


@dataclass(frozen=True)
class StoreKey:
    """Everything that determines the features; two runs mix rows only if all fields agree."""

    model: str  # timm model name
    weights_sha256: str  # hash of the headless state dict used
    data_config: str  # timm data config (JSON)
    preprocessing: str  # 'host' (timm transform) or 'device', plus its geometry (JSON)
    img_size: int  # input resolution
    pooling: str  # how the embedding is pooled
    precision: str  # fp32 / bf16 / fp16 compute
    dtype: str  # storage dtype
    image_list_sha256: str  # hash of ids, labels, splits (and pixels for in-memory datasets)
    image_stamps_sha256: str = ""  # hash of every image file's size and mtime (shards': for tar members)
    layers: str = "last"  # pooled outputs concatenated: 'last', stages or blocks counted from the end
    tta: str = "none"  # test-time augmentation: none | flip

    def differences(self, attrs) -> list[str]:
        """Fields whose recorded value differs. A field a store predates counts as its default (layers, tta), except
        the file stamps, which are checked only where they were recorded (featx > 0.1)."""
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        out = []
        for k, v in asdict(self).items():
            if k not in attrs and k == "image_stamps_sha256":
                continue
            if str(attrs.get(k, defaults.get(k))) != str(v):
                out.append(k)
        return out


@dataclass
class FeatureSet:
    """Features of one group (optionally one split) as numpy arrays."""

    X: np.ndarray  # [n, D] float32
    y: np.ndarray  # [n] int64 (-1: unlabeled)
    ids: np.ndarray  # [n] str
    splits: np.ndarray  # [n] str
    class_names: list[str]
    key: str
    attrs: dict = field(default_factory=dict, repr=False)
    digests: np.ndarray | None = field(default=None, repr=False)  # [n] content digest of each row's image; None: not recorded

    def __len__(self) -> int:
        return len(self.X)

    def subset(self, idx: np.ndarray) -> "FeatureSet":
        """The rows ``idx`` (an index array or a boolean mask)."""
        return FeatureSet(X=self.X[idx], y=self.y[idx], ids=self.ids[idx], splits=self.splits[idx], class_names=self.class_names,
                          key=self.key, attrs=self.attrs, digests=None if self.digests is None else self.digests[idx])

    def count_shared_images(self, other: "FeatureSet") -> int | None:
        """How many of ``other``'s rows show an image that is also one of these rows (same bytes); None if not recorded."""
        if self.digests is None or other.digests is None:
            return None
        mine = self.digests[self.digests != b""]
        theirs = other.digests[other.digests != b""]
        return int(np.isin(theirs, mine).sum())

    def labelled(self, role: str, split: str) -> "FeatureSet":
        """These rows without unlabeled ones (label -1); an error naming the fix when no row is labelled."""
        mask = self.y >= 0
        if not mask.any():
            raise FeatxError(
                f"the {role} split '{split}' of '{self.key}' has no labels (label -1 = unlabeled); "
                "extract labelled images (a <class>/<image> folder or a CSV manifest with a label column)"
            )
        if not mask.all():
            _logger.warning("ignoring %d unlabeled rows of the %s split '%s'", int((~mask).sum()), role, split)
            return self.subset(np.flatnonzero(mask))
        return self

    def require_finite(self, split: str) -> "FeatureSet":
        """These rows, or an error naming the fix when any of them holds NaN or infinite values."""
        bad = np.flatnonzero(~np.isfinite(self.X).all(axis=1))
        if len(bad):
            shown = ", ".join(str(i) for i in self.ids[bad[:3]])
            raise FeatxError(
                f"{len(bad)} feature rows of '{self.key}' (split '{split}') hold NaN or infinite values (e.g. {shown}); "
                "re-extract with 'featx extract ... --dtype float32 --precision fp32 --overwrite'"
            )
        return self



def attr_value(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


class FeatureStore:
    """Read access to a feature store.

    The HDF5 handle is opened lazily in the process that uses it (and reopened after a fork),
    so the object can be handed to DataLoader workers without sharing a handle.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        if not self.path.is_file():
            raise FeatxError(f"feature store '{self.path}' does not exist; create it with 'featx extract SOURCE --model NAME --out {self.path}'")
        if not h5py.is_hdf5(self.path):
            raise FeatxError(f"'{self.path}' is not an HDF5 feature store")

    @property
    def file(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as e:
                raise FeatxError(f"cannot open feature store '{self.path}': {e}") from None
            self._pid = os.getpid()
        return self._file

    def __getstate__(self):
        return {"path": self.path, "_file": None, "_pid": None}

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def models(self) -> list[str]:
        """Keys of the complete feature groups in the store."""
        keys = []
        for k in self.file:
            try:
                g = self.file[k]
            except KeyError:  # a link whose file is gone
                _logger.warning("group '%s' of '%s' cannot be opened (its file in '%s.d' is missing)", k, self.path, self.path.name)
                continue
            if isinstance(g, h5py.Group) and "features" in g:
                keys.append(k)
        return sorted(keys)

    def resolve_key(self, key: str | None = None) -> str:
        models = self.models()
        if key is None:
            if len(models) == 1:
                return models[0]
            if not models:
                raise FeatxError(f"feature store '{self.path}' holds no features")
            raise FeatxError(f"feature store '{self.path}' holds several models ({', '.join(models)}); choose one with --model KEY")
        if key not in models:
            raise FeatxError(f"feature store '{self.path}' has no model '{key}'; it holds: {', '.join(models) or 'nothing'}")
        return key

    def attrs(self, key: str | None = None) -> dict:
        key = self.resolve_key(key)
        return {k: attr_value(v) for k, v in self.file[key].attrs.items()}

    def class_names(self, key: str | None = None) -> list[str]:
        return json.loads(self.attrs(key)["class_names"])

    def split_names(self, key: str | None = None) -> list[str]:
        """Split names that have at least one row, in stored order."""
        key = self.resolve_key(key)
        names = json.loads(self.file[key].attrs["split_names"])
        present = set(np.unique(self.file[key]["split"][:]).tolist())
        return [n for i, n in enumerate(names) if i in present]

    def labelled_splits(self, key: str | None = None) -> set[str]:
        """Names of the splits that hold at least one labelled row."""
        key = self.resolve_key(key)
        g = self.file[key]
        names = json.loads(g.attrs["split_names"])
        codes = np.unique(g["split"][:][g["labels"][:] >= 0])
        return {names[c] for c in codes.tolist()}

    def skipped(self, key: str | None = None) -> list[tuple[str, str]]:
        """(image id, reason) for every image the extraction could not decode."""
        return read_skipped(self.file[self.resolve_key(key)])

    def _rows(self, key: str, split: str | None) -> np.ndarray:
        g = self.file[key]
        n = g["features"].shape[0]
        if split is None:
            return np.arange(n)
        names = json.loads(g.attrs["split_names"])
        if split not in names:
            present = self.split_names(key)
            if not present:
                raise FeatxError(f"model '{key}' in '{self.path}' holds no rows: every image was skipped at extraction "
                                 f"(e.g. {'; '.join(f'{i}: {r}' for i, r in self.skipped(key)[:2])}); fix the images and extract again")
            raise FeatxError(f"model '{key}' in '{self.path}' has no split '{split}'; it has: {', '.join(present)}")
        return np.flatnonzero(g["split"][:] == names.index(split))

    def row_numbers(self, key: str | None = None, split: str | None = None) -> np.ndarray:
        """Row numbers of ``split`` (all rows without it) in the group, ascending."""
        return self._rows(self.resolve_key(key), split)

    def labels_of(self, key: str, rows: np.ndarray) -> np.ndarray:
        """Labels of the sorted ``rows`` (features are not read)."""
        return _take(self.file[self.resolve_key(key)]["labels"], np.asarray(rows))

    def ids_of(self, key: str, rows: np.ndarray) -> list[str]:
        """Image ids of the sorted ``rows`` (features are not read)."""
        return [s.decode() if isinstance(s, bytes) else s for s in _take(self.file[self.resolve_key(key)]["ids"], np.asarray(rows))]

    def features_of(self, key: str, rows: np.ndarray) -> np.ndarray:
        """Features [len(rows), D] (float32) of the sorted ``rows``; only those rows are read."""
        return _take(self.file[self.resolve_key(key)]["features"], np.asarray(rows)).astype(np.float32, copy=False)

    def digests_of(self, key: str, rows: np.ndarray) -> np.ndarray | None:
        """Content digests of the images of the sorted ``rows``; None for stores that did not record them (featx 0.1)."""
        g = self.file[self.resolve_key(key)]
        return _take(g["digest"], np.asarray(rows)) if "digest" in g and _has_digests(g) else None

    def feature_dim(self, key: str | None = None) -> int:
        return int(self.file[self.resolve_key(key)]["features"].shape[1])

    def read(self, key: str | None = None, split: str | None = None, rows: slice | None = None) -> FeatureSet:
        """Features, labels, ids and splits of ``key`` (one ``split``, or a ``rows`` slice of it).

        Only the requested rows are read from disk (contiguous runs are read as slices).
        """
        key = self.resolve_key(key)
        g = self.file[key]
        idx = self._rows(key, split)
        if rows is not None:
            idx = idx[rows]
        names = json.loads(g.attrs["split_names"])
        codes = _take(g["split"], idx)
        return FeatureSet(
            X=_take(g["features"], idx).astype(np.float32, copy=False),
            y=_take(g["labels"], idx),
            ids=np.asarray([s.decode() if isinstance(s, bytes) else s for s in _take(g["ids"], idx)], dtype=object),
            splits=np.asarray(names, dtype=object)[codes] if len(idx) else np.array([], dtype=object),
            class_names=json.loads(g.attrs["class_names"]),
            key=key,
            attrs={k: attr_value(v) for k, v in g.attrs.items()},
            digests=_take(g["digest"], idx) if "digest" in g and _has_digests(g) else None,
        )

    def image_list(self, key: str) -> dict | None:
        """What group ``key`` was extracted from, per image (rows, then skipped images): id, class name, split,
        file size and mtime. None for groups written without file stamps (featx 0.1)."""
        g = self.file[self.resolve_key(key)]
        if "stamp" not in g or "stamp" not in g["skipped"]:
            return None
        classes, splits = json.loads(g.attrs["class_names"]), json.loads(g.attrs["split_names"])
        labels = g["labels"][:]
        return {
            "ids": g["ids"].asstr()[:].tolist() + g["skipped"]["ids"].asstr()[:].tolist(),
            "classes": [classes[y] if y >= 0 else "" for y in labels.tolist()] + [None] * int(g["skipped"]["ids"].shape[0]),
            "splits": [splits[c] for c in g["split"][:].tolist()] + [None] * int(g["skipped"]["ids"].shape[0]),
            "stamps": np.concatenate([g["stamp"][:], g["skipped"]["stamp"][:]]),
        }


def _has_digests(g: h5py.Group) -> bool:
    """Digests were recorded (a group of in-memory images written through the journal without them has empty ones)."""
    return g["digest"].shape[0] == 0 or g["digest"][0] != b""


def read_skipped(group: h5py.Group) -> list[tuple[str, str]]:
    s = group["skipped"]
    return list(zip(s["ids"].asstr()[:].tolist(), s["reasons"].asstr()[:].tolist()))


def _take(ds: h5py.Dataset, idx: np.ndarray) -> np.ndarray:
    """``ds[idx]`` for sorted ``idx``, reading each contiguous run as one slice."""
    if len(idx) == 0:
        return np.empty((0,) + ds.shape[1:], dtype=ds.dtype)
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(idx)]])
    return np.concatenate([ds[idx[s]: idx[e - 1] + 1] for s, e in zip(starts, ends)])


def open_store(path: str | os.PathLike) -> FeatureStore:
    """Open a feature store for reading."""
    return FeatureStore(path)


def load_features(path: str | os.PathLike, key: str | None = None, split: str | None = None) -> FeatureSet:
    """Convenience: read one model's features (optionally one split) from ``path``."""
    with FeatureStore(path) as store:
        return store.read(key, split)
