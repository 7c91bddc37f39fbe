"""The HDF5 feature store: one file, one group per backbone key, read lazily.

Layout of a group ``/<key>`` (all row datasets aligned, in source order)::

    features  [n, D]  float16/float32, chunked, resizable along rows
    labels    [n]     int64 class index (-1: unlabeled)
    ids       [n]     utf-8 image identifier (relative path or dataset index)
    split     [n]     int8 code into attrs['split_names']
    index     [n]     int64 position of the image in the source's image list
    skipped/{ids,index,reasons}  images that could not be decoded, with the reason

and attributes recording what produced it (model, weights hash, data config, versions,
image-list hash ...; see :class:`StoreKey`). Extraction writes into a journal file beside the
store and commits the finished group into the store by an atomic rename, so an interrupted run
never damages groups already there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .errors import FeatxError

__all__ = ["StoreKey", "FeatureSet", "FeatureStore", "open_store", "load_features", "JournalWriter", "journal_path"]

_STR = h5py.string_dtype("utf-8")
_logger = logging.getLogger(__name__)
# Row datasets of a group, then those of its 'skipped' subgroup: what the progress digest covers.
_ROW_COLUMNS = ("features", "labels", "ids", "split", "index")
_SKIP_COLUMNS = ("index", "ids", "reasons")


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

    def differences(self, attrs) -> list[str]:
        return [k for k, v in asdict(self).items() if str(attrs.get(k)) != str(v)]


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

    def __len__(self) -> int:
        return len(self.X)


def _attr(v):
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
        return sorted(k for k, g in self.file.items() if isinstance(g, h5py.Group) and "features" in g)

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
        return {k: _attr(v) for k, v in self.file[key].attrs.items()}

    def class_names(self, key: str | None = None) -> list[str]:
        return json.loads(self.attrs(key)["class_names"])

    def split_names(self, key: str | None = None) -> list[str]:
        """Split names that have at least one row, in stored order."""
        key = self.resolve_key(key)
        names = json.loads(self.file[key].attrs["split_names"])
        present = set(np.unique(self.file[key]["split"][:]).tolist())
        return [n for i, n in enumerate(names) if i in present]

    def num_rows(self, key: str | None = None, split: str | None = None) -> int:
        return len(self._rows(self.resolve_key(key), split))

    def skipped(self, key: str | None = None) -> list[tuple[str, str]]:
        """(image id, reason) for every image the extraction could not decode."""
        return _skipped(self.file[self.resolve_key(key)])

    def _rows(self, key: str, split: str | None) -> np.ndarray:
        g = self.file[key]
        n = g["features"].shape[0]
        if split is None:
            return np.arange(n)
        names = json.loads(g.attrs["split_names"])
        if split not in names:
            raise FeatxError(f"model '{key}' in '{self.path}' has no split '{split}'; it has: {', '.join(self.split_names(key))}")
        return np.flatnonzero(g["split"][:] == names.index(split))

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
            attrs={k: _attr(v) for k, v in g.attrs.items()},
        )


def _skipped(group: h5py.Group) -> list[tuple[str, str]]:
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


def journal_path(out: str | os.PathLike, key: str) -> Path:
    out = Path(out)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return out.with_name(f"{out.name}.{safe}.partial")


class JournalWriter:
    """Writes one group's rows into the journal as batches finish; ``commit`` moves it into the store.

    Each batch is written and flushed first; only then are the progress attributes (``next_image``,
    row and skip counts, and a sha256 digest of every row column up to those counts) written and
    flushed. On resume the rows up to the recorded counts are read back and must reproduce the
    digest: a journal that a kill left unreadable or inconsistent is discarded and the run starts
    over, so a kill at any point loses work but never yields wrong rows.
    """

    def __init__(self, out: str | os.PathLike, key: str, store_key: StoreKey, meta: dict, *, dim: int, n_images: int,
                 batch_size: int, split_names: list[str]):
        self.out = Path(out)
        self.key = key
        self.path = journal_path(out, key)
        self.store_key = store_key
        self.split_names = split_names
        self.resumed = False
        self._hashers: dict[str, "hashlib._Hash"] = {}
        if self.path.exists():
            self.resumed = self._open_existing(n_images)
        if not self.resumed:
            self._create(meta, dim=dim, n_images=n_images, batch_size=batch_size)

    # -- opening -------------------------------------------------------------------------
    def _open_existing(self, n_images: int, lock_wait_s: float = 15.0) -> bool:
        deadline = time.monotonic() + lock_wait_s
        while True:
            try:
                f = h5py.File(self.path, "a")
                break
            except OSError as e:
                # not a substring test on "lock": "sblock" appears in HDF5's corruption errors
                if not isinstance(e, BlockingIOError) and "unable to lock file" not in str(e).lower():
                    return self._discard(f"unreadable ({str(e).splitlines()[0][:120]})")
                # the lock is shared with the decoding workers a killed run forked; they exit within seconds
                if time.monotonic() > deadline:
                    raise FeatxError(f"another featx process is writing '{self.path}'; wait for it to finish") from None
                time.sleep(0.5)
        try:
            g = f.get(self.key)
            if g is None or "features" not in g or "progress_sha256" not in g.attrs:
                f.close()
                return self._discard("it was interrupted before its first batch")
            diff = self.store_key.differences(g.attrs)
            if diff:
                f.close()
                raise FeatxError(
                    f"an interrupted extraction with different {', '.join(diff)} is waiting in '{self.path}'; "
                    "rerun it with its original options to finish it, or delete that file to start over"
                )
            rows, skips, next_image = int(g.attrs["n_rows"]), int(g.attrs["n_skipped"]), int(g.attrs["next_image"])
            hashers = _column_hashers(g, rows, skips)
            ok = rows + skips == next_image <= n_images and _progress_digest(hashers, rows, skips, next_image) == g.attrs["progress_sha256"]
        except FeatxError:
            raise
        except Exception as e:  # a kill mid-flush can leave any HDF5 structure half written
            ok, hashers = False, None
            _logger.debug("journal check failed: %r", e)
        if not ok:
            f.close()
            return self._discard("its rows do not match its recorded progress (killed while writing)")
        for name in _ROW_COLUMNS:
            g[name].resize(rows, axis=0)
        for name in _SKIP_COLUMNS:
            g["skipped"][name].resize(skips, axis=0)
        f.flush()
        self.f, self.g, self._hashers = f, g, hashers
        return True

    def _discard(self, why: str) -> bool:
        _logger.warning("discarding the interrupted extraction in '%s' (%s); starting over", self.path, why)
        self.path.unlink()
        return False

    def _create(self, meta: dict, *, dim: int, n_images: int, batch_size: int) -> None:
        try:
            f = h5py.File(self.path, "w")
        except OSError as e:
            raise FeatxError(f"cannot write '{self.path}': {e.strerror or e}") from None
        g = f.create_group(self.key)
        dtype = np.dtype(self.store_key.dtype)
        chunk_rows = int(max(1, min(max(n_images, 1), (1 << 20) // (dim * dtype.itemsize))))
        g.create_dataset("features", shape=(0, dim), maxshape=(None, dim), dtype=dtype, chunks=(chunk_rows, dim))
        row_chunk = (max(1, min(max(n_images, 1), 65536)),)
        g.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=row_chunk)
        g.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=_STR, chunks=row_chunk)
        g.create_dataset("split", shape=(0,), maxshape=(None,), dtype=np.int8, chunks=row_chunk)
        g.create_dataset("index", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=row_chunk)
        s = g.create_group("skipped")
        s.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(1024,))
        s.create_dataset("index", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
        s.create_dataset("reasons", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(1024,))
        for k, v in {**asdict(self.store_key), **meta}.items():
            g.attrs[k] = v
        g.attrs["split_names"] = json.dumps(self.split_names)
        self._hashers = _column_hashers(g, 0, 0)
        g.attrs.update({"batch_size": batch_size, "next_image": 0, "n_rows": 0, "n_skipped": 0, "complete": False,
                        "progress_sha256": _progress_digest(self._hashers, 0, 0, 0)})
        f.flush()
        self.f, self.g = f, g

    # -- writing -------------------------------------------------------------------------
    @property
    def next_image(self) -> int:
        return int(self.g.attrs["next_image"])

    @property
    def batch_size(self) -> int:
        return int(self.g.attrs["batch_size"])

    def skipped(self) -> list[tuple[str, str]]:
        """(image id, reason) of the images skipped so far."""
        return _skipped(self.g)

    def write_batch(self, next_image: int, features: np.ndarray, index: np.ndarray, ids: list[str], labels: np.ndarray,
                    split_codes: np.ndarray, skipped: list[tuple[int, str, str]]) -> None:
        """Append one batch's rows and skipped images, then record progress up to ``next_image``."""
        g = self.g
        rows, n = int(g.attrs["n_rows"]), len(features)
        skips = int(g.attrs["n_skipped"])
        if n:
            for name, values in zip(_ROW_COLUMNS, (features, labels, ids, split_codes, index)):
                g[name].resize(rows + n, axis=0)
                g[name][rows:] = values
        if skipped:
            s = g["skipped"]
            for name, col in zip(_SKIP_COLUMNS, (0, 1, 2)):
                s[name].resize(skips + len(skipped), axis=0)
                s[name][skips:] = [row[col] for row in skipped]
        self.f.flush()  # rows reach the file before the progress that vouches for them
        if n:
            for name in _ROW_COLUMNS:
                _hash_update(self._hashers[name], g[name], rows, rows + n)
        if skipped:
            for name in _SKIP_COLUMNS:
                _hash_update(self._hashers["skipped/" + name], g["skipped"][name], skips, skips + len(skipped))
        rows, skips = rows + n, skips + len(skipped)
        g.attrs.update({"n_rows": rows, "n_skipped": skips, "next_image": next_image,
                        "progress_sha256": _progress_digest(self._hashers, rows, skips, next_image)})
        self.f.flush()

    def commit(self, extra_attrs: dict, *, overwrite: bool = False) -> None:
        """Mark the group complete and move it into the store atomically."""
        self.g.attrs.update({**extra_attrs, "complete": True})
        self.f.flush()
        self.f.close()
        commit_group(self.path, self.out, self.key, overwrite=overwrite)

    def close(self) -> None:
        try:
            self.f.close()
        except Exception:
            pass


def _column_hashers(g: h5py.Group, rows: int, skips: int) -> dict:
    """sha256 of each row column of ``g`` up to ``rows`` / ``skips``, as stored on disk."""
    hashers = {}
    for name in _ROW_COLUMNS:
        hashers[name] = hashlib.sha256()
        _hash_update(hashers[name], g[name], 0, rows)
    for name in _SKIP_COLUMNS:
        hashers["skipped/" + name] = hashlib.sha256()
        _hash_update(hashers["skipped/" + name], g["skipped"][name], 0, skips)
    return hashers


def _hash_update(h, ds: h5py.Dataset, start: int, stop: int, block: int = 65536) -> None:
    """Feed rows ``start:stop`` of ``ds`` to ``h``, read back from the file (what a resume will see)."""
    for a in range(start, stop, block):
        values = ds[a : min(stop, a + block)]
        if values.dtype == object:
            h.update(b"".join((v if isinstance(v, bytes) else str(v).encode()) + b"\0" for v in values))
        else:
            h.update(np.ascontiguousarray(values).tobytes())


def _progress_digest(hashers: dict, rows: int, skips: int, next_image: int) -> str:
    h = hashlib.sha256(f"{rows}:{skips}:{next_image}".encode())
    for name in sorted(hashers):
        h.update(f"{name}={hashers[name].hexdigest()};".encode())
    return h.hexdigest()


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
