"""The journal: one group's rows written batch by batch beside the store, resumable after any kill."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np

from ..errors import FeatxError
from ..files import safe_name
from ._commit import commit_group
from ._layout import already_committed
from ._reader import StoreKey, read_skipped

__all__ = ["JournalWriter", "journal_path", "forget_committed_journals"]

_STR = h5py.string_dtype("utf-8")
_logger = logging.getLogger(__name__)
# Row datasets of a group, then those of its 'skipped' subgroup: what the progress digest covers.
_ROW_COLUMNS = ("features", "labels", "ids", "split", "index", "digest", "stamp")
_SKIP_COLUMNS = ("index", "ids", "reasons", "stamp")
DIGEST_DTYPE = np.dtype("S32")  # hex BLAKE2b-128 of the bytes each image was decoded from


def journal_path(out: str | os.PathLike, key: str, part: str = "") -> Path:
    """``FEATURES.h5.<key>.partial``, or ``FEATURES.h5.<key>.<part>.partial`` for one rank's share."""
    out = Path(out)
    return out.with_name(f"{out.name}.{safe_name(key)}{'.' + part if part else ''}.partial")


def forget_committed_journals(out: str | os.PathLike, key: str) -> None:
    """Remove journals of ``key`` that are already in the store (a kill struck between a commit and its clean-up)."""
    out = Path(out)
    for path in out.parent.glob(f"{out.name}.{safe_name(key)}*.partial"):
        if already_committed(path, out):
            path.unlink(missing_ok=True)


class JournalWriter:
    """Writes one group's rows into the journal as batches finish; ``commit`` moves it into the store.

    Each batch is written and flushed first; only then are the progress attributes (``next_image``,
    row and skip counts, and a sha256 digest of every row column up to those counts) written and
    flushed. On resume the rows up to the recorded counts are read back and must reproduce the
    digest: a journal that a kill left unreadable or inconsistent is discarded and the run starts
    over, so a kill at any point loses work but never yields wrong rows. The verified rows are
    copied into a fresh file that replaces the journal, which is never written in place after a kill.
    """

    def __init__(self, out: str | os.PathLike, key: str, store_key: StoreKey, meta: dict, *, dim: int, n_images: int,
                 batch_size: int, split_names: list[str], part: str = ""):
        self.out = Path(out)
        self.key = key
        self.path = journal_path(out, key, part)
        self.store_key = store_key
        self.split_names = split_names
        self.resumed = False
        self._hashers: dict[str, "hashlib._Hash"] = {}
        if self.path.exists() and already_committed(self.path, self.out):
            self.path.unlink()  # committed already; only its old name was left behind
        if self.path.exists():
            self.resumed = self._open_existing(n_images)
        if not self.resumed:
            self._create(meta, dim=dim, n_images=n_images, batch_size=batch_size)

    # -- opening -------------------------------------------------------------------------
    def _open_existing(self, n_images: int, lock_wait_s: float = 15.0) -> bool:
        deadline = time.monotonic() + lock_wait_s
        while True:
            try:
                f = h5py.File(self.path, "r")
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
        try:
            self._rebuild(f, g, rows, skips)
        except Exception as e:  # rows that verified but cannot be copied: start over rather than trust them
            f.close()
            self.path.with_name(self.path.name + ".rebuild").unlink(missing_ok=True)
            return self._discard(f"its rows cannot be copied ({str(e).splitlines()[0][:120]})")
        self._hashers = hashers
        return True

    def _rebuild(self, f: h5py.File, g: h5py.Group, rows: int, skips: int) -> None:
        """Copy the verified rows into a fresh file that replaces the journal, and open that for writing.

        A write killed mid-flush can leave HDF5 structures (the string heap, a chunk index) that read
        back fine but fail on the next write, so a journal is never written in place after a kill.
        """
        tmp = self.path.with_name(self.path.name + ".rebuild")
        with h5py.File(tmp, "w") as out:
            new = out.create_group(self.key)
            _copy_columns(g, new, _ROW_COLUMNS, rows)
            _copy_columns(g["skipped"], new.create_group("skipped"), _SKIP_COLUMNS, skips)
            for k, v in g.attrs.items():
                new.attrs[k] = v
        f.close()
        os.replace(tmp, self.path)
        self.f = h5py.File(self.path, "a")
        self.g = self.f[self.key]

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
        g.create_dataset("digest", shape=(0,), maxshape=(None,), dtype=DIGEST_DTYPE, chunks=row_chunk)
        g.create_dataset("stamp", shape=(0, 2), maxshape=(None, 2), dtype=np.int64, chunks=(row_chunk[0], 2))
        s = g.create_group("skipped")
        s.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(1024,))
        s.create_dataset("index", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
        s.create_dataset("reasons", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(1024,))
        s.create_dataset("stamp", shape=(0, 2), maxshape=(None, 2), dtype=np.int64, chunks=(1024, 2))
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
        return read_skipped(self.g)

    def write_batch(self, next_image: int, features: np.ndarray, index: np.ndarray, ids: list[str], labels: np.ndarray,
                    split_codes: np.ndarray, skipped: list[tuple[int, str, str]], *, digests: list[str] | None = None,
                    stamps: np.ndarray | None = None, skipped_stamps: np.ndarray | None = None) -> None:
        """Append one batch's rows and skipped images (index, id, reason), then record progress up to ``next_image``.

        ``digests`` (hex content digests) and ``stamps`` ([n, 2] file size and mtime) of the rows and
        of the skipped images are stored when given (empty digests and zero stamps otherwise).
        """
        with _interrupts_deferred():  # rows, hashes and progress land together, or not at all
            g = self.g
            rows, n = int(g.attrs["n_rows"]), len(features)
            skips = int(g.attrs["n_skipped"])
            if n:
                digests = np.asarray(digests if digests is not None else [""] * n, dtype=DIGEST_DTYPE)
                stamps = np.zeros((n, 2), np.int64) if stamps is None else stamps
                for name, values in zip(_ROW_COLUMNS, (features, labels, ids, split_codes, index, digests, stamps)):
                    g[name].resize(rows + n, axis=0)
                    g[name][rows:] = values
            if skipped:
                s = g["skipped"]
                skipped_stamps = np.zeros((len(skipped), 2), np.int64) if skipped_stamps is None else skipped_stamps
                columns = ([row[0] for row in skipped], [row[1] for row in skipped], [row[2] for row in skipped], skipped_stamps)
                for name, values in zip(_SKIP_COLUMNS, columns):
                    s[name].resize(skips + len(skipped), axis=0)
                    s[name][skips:] = values
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

    def finish(self, extra_attrs: dict) -> None:
        """Record ``extra_attrs``, mark the journal complete and close it (every image has a row or a skip)."""
        self.g.attrs.update({**extra_attrs, "complete": True})
        self.f.flush()
        self.f.close()

    def commit(self, extra_attrs: dict, *, overwrite: bool = False) -> None:
        """Finish the journal and make it the store's group ``key`` atomically."""
        self.finish(extra_attrs)
        commit_group(self.path, self.out, self.key, overwrite=overwrite)

    def discard(self) -> None:
        """Close and delete the journal: the run is abandoned and nothing reaches the store."""
        self.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        try:
            self.f.close()
        except Exception:
            pass


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold a Ctrl-C (SIGINT) until the block ends, then deliver it: a batch's rows, their digests and the progress that
    vouches for them are written together or not at all. (A Ctrl-C between two progress attributes left a journal that no
    longer verified, and the resume discarded every row.) SIGKILL cannot be held: that is what the verification is for."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    previous = signal.SIG_DFL if previous is None else previous  # a handler not installed from Python
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held and callable(previous):
            previous(signal.SIGINT, held[0])
        elif held and previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)


def _copy_columns(src: h5py.Group, dst: h5py.Group, names: tuple[str, ...], n: int, block: int = 65536) -> None:
    """The first ``n`` rows of each column ``names`` of ``src`` into new, equally laid out datasets of ``dst``."""
    for name in names:
        ds = src[name]
        out = dst.create_dataset(name, shape=(n,) + ds.shape[1:], maxshape=(None,) + ds.shape[1:], dtype=ds.dtype, chunks=ds.chunks)
        for a in range(0, n, block):
            out[a: min(n, a + block)] = ds[a: min(n, a + block)]


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
