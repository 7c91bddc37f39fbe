"""Image sources: folders, CSV manifests and named datasets, as one ordered list of images.

Every source resolves to an :class:`ImageSource`: image identifiers, integer labels, split names
and class names, plus a way to load image ``i`` as an RGB PIL image. The order is deterministic
(sorted paths), so the same source always yields the same image list and the same hash.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import FeatxError
from .images import open_image
from .splits import SPLIT_FOLDER_NAMES

__all__ = ["ImageSource", "resolve_source", "images_source", "IMG_EXTENSIONS"]

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
UNLABELED = -1


@dataclass
class ImageSource:
    """An ordered list of images with labels, splits and class names."""

    name: str  # what the user passed (path or dataset name), for messages and metadata
    ids: list[str]  # relative paths for files, '<dataset>/<split>/<index>' for named datasets
    labels: np.ndarray  # int64 class index per image, -1 where unlabeled
    splits: list[str]  # split name per image
    class_names: list[str]  # index -> class name
    root: Path | None = None  # folder that relative ids are resolved against
    arrays: np.ndarray | None = field(default=None, repr=False)  # in-memory uint8 images, if any

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def split_names(self) -> list[str]:
        """Split names in order of first appearance."""
        return list(dict.fromkeys(self.splits))

    def path(self, i: int) -> Path | None:
        return None if self.root is None else self.root / self.ids[i]

    def load(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB PIL image; raises :class:`BadImage` if it cannot be decoded."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i]).convert("RGB")
        return open_image(self.root / self.ids[i])

    def fingerprint(self) -> str:
        """sha256 of the image list (ids, labels, splits; pixel data for in-memory datasets)."""
        h = hashlib.sha256()
        for i, y, s in zip(self.ids, self.labels.tolist(), self.splits):
            h.update(f"{i}\t{y}\t{s}\n".encode())
        h.update("\n".join(self.class_names).encode())
        if self.arrays is not None:
            h.update(np.ascontiguousarray(self.arrays).tobytes())
        return h.hexdigest()

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
        )


def resolve_source(spec: str | os.PathLike) -> ImageSource:
    """Turn a command-line SOURCE into an :class:`ImageSource`.

    Accepts a folder (``<class>/<image>`` or ``<split>/<class>/<image>``), a CSV manifest with
    columns ``path,label[,split]``, ``fashion-mnist[:DIR]`` or ``digits``.
    """
    text = str(spec)
    if text == "digits":
        return _digits()
    if text == "fashion-mnist" or text.startswith("fashion-mnist:"):
        return _fashion_mnist(text.partition(":")[2] or FASHION_MNIST_DIR)
    path = Path(text)
    if not path.exists():
        raise FeatxError(f"source '{text}' does not exist (expected a folder, a .csv manifest, 'digits' or 'fashion-mnist[:DIR]')")
    if path.is_dir():
        return _folder(path)
    if path.suffix.lower() == ".csv":
        return _manifest(path)
    raise FeatxError(f"source '{text}' is a file but not a .csv manifest; pass an image folder or a CSV with columns path,label[,split]")


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


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMG_EXTENSIONS


def _subdirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def _folder(root: Path) -> ImageSource:
    """``<class>/<image>``, split-first ``<split>/<class>/<image>``, or a flat folder of unlabeled images."""
    top = _subdirs(root)
    loose = sorted((f for f in root.iterdir() if _is_image(f)), key=lambda f: f.name)
    split_first = bool(top) and all(d.name.lower() in SPLIT_FOLDER_NAMES for d in top)
    entries: list[tuple[str, str, str]] = []  # (relative path, class, split)
    empty: list[str] = []
    for split_dir in top if split_first else [None]:
        for cls_dir in _subdirs(split_dir) if split_dir else top:
            files = _walk(cls_dir)
            entries += [(str(f.relative_to(root)), cls_dir.name, split_dir.name if split_dir else "train") for f in files]
            if not files:
                empty.append(str(cls_dir.relative_to(root)))
    if not entries and loose:
        return _flat(root, loose)
    if not entries:
        layout = "<split>/<class>/<image>" if split_first else "<class>/<image> (or images directly in it)"
        raise FeatxError(f"no images found in '{root}' (expected {layout} with extensions {', '.join(IMG_EXTENSIONS)})")
    if empty:
        _logger.warning("%d class folders of '%s' hold no images and are not classes: %s", len(empty), root, _first(empty))
    if loose:
        _logger.warning("%d images lie directly in '%s', outside any class folder, and are ignored: %s", len(loose), root,
                        _first([f.name for f in loose]))
    class_names = sorted({c for _, c, _ in entries})
    index = {c: k for k, c in enumerate(class_names)}
    return ImageSource(
        name=str(root),
        ids=[e[0] for e in entries],
        labels=np.array([index[e[1]] for e in entries], dtype=np.int64),
        splits=[e[2] for e in entries],
        class_names=class_names,
        root=root,
    )


def _flat(root: Path, files: list[Path]) -> ImageSource:
    """A folder of images without class folders: unlabeled (what ``featx predict new_photos/`` reads)."""
    return ImageSource(name=str(root), ids=[f.name for f in files], labels=np.full(len(files), UNLABELED, dtype=np.int64),
                       splits=["train"] * len(files), class_names=[], root=root)


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _walk(d: Path) -> list[Path]:
    """Image files under ``d`` (recursively), sorted for a deterministic order."""
    return sorted((p for p in d.rglob("*") if _is_image(p)), key=lambda p: p.as_posix())


def _read_manifest(csv_path: Path) -> tuple[list[str], list[dict]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [(c or "").strip().lower() for c in (reader.fieldnames or [])]
            return fields, list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FeatxError(f"cannot read CSV manifest '{csv_path}': {e}") from None


def _manifest(csv_path: Path) -> ImageSource:
    """A CSV with columns ``path[,label][,split]``: paths relative to the CSV's folder (or absolute)."""
    fields, raw = _read_manifest(csv_path)
    if "path" not in fields:
        missing = [c for c in ("path", "label") if c not in fields]
        raise FeatxError(f"CSV manifest '{csv_path}' lacks column(s) {', '.join(missing)}; it needs a header 'path,label[,split]' "
                         f"(or just 'path' for unlabeled images; found: {', '.join(fields) or 'no header'})")
    extra = sum(1 for r in raw if None in r)  # values beyond the header come back under the key None
    rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k is not None} for r in raw]
    no_path = sum(1 for r in rows if not r.get("path"))
    rows = [r for r in rows if r.get("path")]
    if not rows:
        raise FeatxError(f"CSV manifest '{csv_path}' lists no images")
    for count, what in ((extra, "have more values than the header (the extra values are ignored)"),
                        (no_path, "have an empty path and are skipped")):
        if count:
            _logger.warning("%d rows of '%s' %s", count, csv_path, what)
    labelled = "label" in fields
    if labelled and (unlabeled := sum(1 for r in rows if not r["label"])):
        _logger.warning("%d rows of '%s' have no label and are kept as unlabeled", unlabeled, csv_path)
    _check_relative_paths(csv_path, [r["path"] for r in rows])
    splits = [r.get("split") or "train" for r in rows]
    _warn_odd_split_names(csv_path, splits)
    names = sorted({r["label"] for r in rows if r.get("label")}, key=_natural_key)
    index = {c: k for k, c in enumerate(names)}
    return ImageSource(
        name=str(csv_path),
        ids=[r["path"] for r in rows],
        labels=np.array([index[r["label"]] if r.get("label") else UNLABELED for r in rows], dtype=np.int64),
        splits=splits,
        class_names=names,
        root=csv_path.parent,
    )


def _check_relative_paths(csv_path: Path, paths: list[str], sample: int = 20) -> None:
    """Refuse a manifest whose paths are relative to the working directory instead of to the CSV."""
    checked = paths[:sample]
    if any((csv_path.parent / p).exists() for p in checked):
        return
    if any(Path(p).exists() for p in checked):
        raise FeatxError(f"the paths in '{csv_path}' are read relative to its folder '{csv_path.parent}', where '{checked[0]}' "
                         "does not exist (it does relative to the working directory); write them relative to the CSV, or absolute")


def _warn_odd_split_names(csv_path: Path, splits: list[str]) -> None:
    """Warn about split names that are not known and close to one that is (``tset`` for ``test``)."""
    import difflib

    for name in dict.fromkeys(splits):
        if name.lower() in SPLIT_FOLDER_NAMES:
            continue
        close = difflib.get_close_matches(name.lower(), SPLIT_FOLDER_NAMES, n=1, cutoff=0.6)
        if close:
            _logger.warning("split '%s' of '%s' (%d rows) is not a known split name; did you mean '%s'?", name, csv_path,
                            splits.count(name), close[0])


def _natural_key(s: str):
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


def _digits() -> ImageSource:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    n = len(images)
    return ImageSource(
        name="digits",
        ids=[f"digits/{i}" for i in range(n)],
        labels=d.target.astype(np.int64),
        splits=["train"] * n,
        class_names=[str(c) for c in d.target_names],
        arrays=images,
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise FeatxError(f"'{path}' is not an unsigned-byte idx file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(directory: str) -> ImageSource:
    root = Path(directory)

    def find(stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (root / name).exists():
                return root / name
        raise FeatxError(
            f"Fashion-MNIST file '{stem}[.gz]' not found in '{root}'; "
            "install it with 'apt-get install dataset-fashion-mnist' or pass fashion-mnist:DIR"
        )

    images, labels, ids, splits = [], [], [], []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(find(f"{prefix}-images-idx3-ubyte"))
        y = _read_idx(find(f"{prefix}-labels-idx1-ubyte"))
        images.append(x)
        labels.append(y.astype(np.int64))
        ids += [f"fashion-mnist/{split}/{i}" for i in range(len(x))]
        splits += [split] * len(x)
    return ImageSource(
        name="fashion-mnist",
        ids=ids,
        labels=np.concatenate(labels),
        splits=splits,
        class_names=list(FASHION_MNIST_CLASSES),
        arrays=np.concatenate(images),
    )
