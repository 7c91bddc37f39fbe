"""The ordered image list every source resolves to, and how one image is read from it."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import BadImage, FeatxError
from ..images import IMG_EXTENSIONS, decode_image, open_image

__all__ = ["ImageSource", "TarMembers", "images_source", "content_digest", "UNLABELED", "IMG_EXTENSIONS"]

UNLABELED = -1


def content_digest(data: bytes) -> str:
    """Hex digest (128-bit BLAKE2b) of the bytes an image was decoded from: equal files, equal digests."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class TarMembers:
    """Where each image of a tar-shard source lies: shard file, byte offset and size of its member."""

    shards: list[str]  # shard file paths
    shard: np.ndarray  # [n] int32 index into shards
    offset: np.ndarray  # [n] int64 offset of the member's data in its shard
    size: np.ndarray  # [n] int64 member size in bytes

    def read(self, i: int) -> bytes:
        path = self.shards[int(self.shard[i])]
        try:
            with open(path, "rb") as f:
                f.seek(int(self.offset[i]))
                data = f.read(int(self.size[i]))
        except OSError as e:
            raise BadImage(f"cannot read tar shard '{path}': {e.strerror or e}") from None
        if len(data) < int(self.size[i]):
            raise BadImage(f"truncated tar member ({len(data)} of {int(self.size[i])} bytes)")
        return data

    def subset(self, idx: np.ndarray) -> "TarMembers":
        return TarMembers(self.shards, self.shard[idx], self.offset[idx], self.size[idx])


@dataclass
class ImageSource:
    """An ordered list of images with labels, splits and class names."""

    name: str  # what the user passed (path or dataset name), for messages and metadata
    ids: list[str]  # relative paths for files, '<dataset>/<split>/<index>' for named datasets, '<shard>/<key>' for tar shards
    labels: np.ndarray  # int64 class index per image, -1 where unlabeled
    splits: list[str]  # split name per image
    class_names: list[str]  # index -> class name
    root: Path | None = None  # folder that relative ids are resolved against
    arrays: np.ndarray | None = field(default=None, repr=False)  # in-memory uint8 images, if any
    tar: TarMembers | None = field(default=None, repr=False)  # members of tar shards, if any
    stamps: np.ndarray | None = field(default=None, repr=False)  # [n, 2] int64 (size, mtime_ns); see file_stamps()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def split_names(self) -> list[str]:
        """Split names in order of first appearance."""
        return list(dict.fromkeys(self.splits))

    def path(self, i: int) -> Path | None:
        return None if self.root is None or self.tar is not None else self.root / self.ids[i]

    def load(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB PIL image; raises :class:`BadImage` if it cannot be decoded."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i]).convert("RGB")
        if self.tar is not None:
            return decode_image(self.tar.read(i))
        return open_image(self.root / self.ids[i])

    def load_with_digest(self, i: int) -> tuple[Image.Image | None, str | None, str | None]:
        """(image, content digest, None), or (None, digest or None, reason) when image ``i`` cannot be decoded.

        The file (or member, or array) is read once; the digest is of those bytes, so the same image
        stored under two names has one digest.
        """
        try:
            if self.arrays is not None:
                a = np.ascontiguousarray(self.arrays[i])
                return Image.fromarray(a).convert("RGB"), content_digest(str(a.shape).encode() + a.tobytes()), None
            data = self.tar.read(i) if self.tar is not None else _read_file(self.root / self.ids[i])
        except BadImage as e:
            return None, None, str(e)
        digest = content_digest(data)
        try:
            return decode_image(data), digest, None
        except BadImage as e:
            return None, digest, str(e)

    def fingerprint(self) -> str:
        """sha256 of the image list (ids, labels, splits; pixel data for in-memory datasets)."""
        h = hashlib.sha256()
        for i, y, s in zip(self.ids, self.labels.tolist(), self.splits):
            h.update(f"{i}\t{y}\t{s}\n".encode())
        h.update("\n".join(self.class_names).encode())
        if self.arrays is not None:
            h.update(np.ascontiguousarray(self.arrays).tobytes())
        return h.hexdigest()

    def file_stamps(self) -> np.ndarray:
        """[n, 2] int64 (size, mtime in ns) of each image's file (its shard for tar members; 0 for in-memory images).

        Computed once (one ``stat`` per file, or per shard) and kept; -1 for a file that is missing.
        """
        if self.stamps is None:
            n = len(self)
            if self.arrays is not None or self.root is None:
                self.stamps = np.zeros((n, 2), np.int64)
            elif self.tar is not None:
                per_shard = np.array([_stat(Path(p)) for p in self.tar.shards], np.int64).reshape(-1, 2)
                self.stamps = per_shard[self.tar.shard]
            else:
                self.stamps = np.array([_stat(self.root / i) for i in self.ids], np.int64).reshape(n, 2)
        return self.stamps

    def stamps_fingerprint(self) -> str:
        """sha256 of every image's file size and modification time: changes when a file is replaced or touched."""
        return hashlib.sha256(np.ascontiguousarray(self.file_stamps()).tobytes()).hexdigest()

    def shard_starts(self) -> np.ndarray | None:
        """Positions where a new tar shard begins (tar sources), else None."""
        if self.tar is None:
            return None
        return np.flatnonzero(np.r_[True, self.tar.shard[1:] != self.tar.shard[:-1]]) if len(self) else np.zeros(0, np.int64)

    def subset(self, indices) -> "ImageSource":
        """A new source holding only ``indices`` (kept in the given order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSource(
            name=self.name,
            ids=[self.ids[i] for i in idx],
            labels=self.labels[idx],
            splits=[self.splits[i] for i in idx],
            class_names=list(self.class_names),
            root=self.root,
            arrays=None if self.arrays is None else self.arrays[idx],
            tar=None if self.tar is None else self.tar.subset(idx),
            stamps=None if self.stamps is None else self.stamps[idx],
        )


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except OSError as e:
        raise BadImage(f"cannot read file: {e.strerror or e}") from None


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def images_source(items) -> ImageSource:
    """An unlabeled source over image paths, or over in-memory PIL images or uint8 arrays (any sizes)."""
    items = list(items)
    n = len(items)
    if all(isinstance(x, (str, os.PathLike)) for x in items):
        return ImageSource(name="images", ids=[str(x) for x in items], labels=np.full(n, UNLABELED, dtype=np.int64),
                           splits=["train"] * n, class_names=[], root=Path("."))
    arrays = np.empty(n, dtype=object)
    for i, x in enumerate(items):
        if not isinstance(x, (Image.Image, np.ndarray)):
            raise FeatxError(f"item {i} is a {type(x).__name__}; pass image paths, PIL images or uint8 arrays")
        arrays[i] = np.asarray(x.convert("RGB") if isinstance(x, Image.Image) else x, dtype=np.uint8)
    return ImageSource(name="images", ids=[f"images/{i}" for i in range(n)], labels=np.full(n, UNLABELED, dtype=np.int64),
                       splits=["train"] * n, class_names=[], arrays=arrays)
