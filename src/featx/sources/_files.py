"""Image files on disk: folder layouts and CSV manifests; the named datasets held in memory."""

from __future__ import annotations

import csv
import gzip
import logging
import struct
from pathlib import Path

import numpy as np

from ..errors import FeatxError
from ..splits import SPLIT_FOLDER_NAMES
from ._source import IMG_EXTENSIONS, UNLABELED, ImageSource

__all__ = ["folder_source", "manifest_source", "natural_key", "digits_source", "fashion_mnist_source", "FASHION_MNIST_DIR"]

_logger = logging.getLogger(__name__)
_MANIFEST_COLUMNS = ("path", "label", "split")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMG_EXTENSIONS


def _subdirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def folder_source(root: Path) -> ImageSource:
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


def _read_manifest(csv_path: Path) -> tuple[list[str], list[dict], list[int]]:
    """(lower-case column names, rows, the line each row ends on)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [(c or "").strip().lower() for c in (reader.fieldnames or [])]
            rows, lines = [], []
            for row in reader:
                rows.append(row)
                lines.append(reader.line_num)
            return fields, rows, lines
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FeatxError(f"cannot read CSV manifest '{csv_path}': {e}") from None


def manifest_source(csv_path: Path) -> ImageSource:
    """A CSV with columns ``path[,label][,split]``: paths relative to the CSV's folder (or absolute)."""
    fields, raw, lines = _read_manifest(csv_path)
    if "path" not in fields:
        missing = [c for c in ("path", "label") if c not in fields]
        raise FeatxError(f"CSV manifest '{csv_path}' lacks column(s) {', '.join(missing)}; it needs a header 'path,label[,split]' "
                         f"(or just 'path' for unlabeled images; found: {', '.join(fields) or 'no header'})")
    if unread := [c or "(unnamed)" for c in fields if c not in _MANIFEST_COLUMNS]:
        _logger.warning("columns %s of '%s' are not read (featx reads %s)", ", ".join(unread), csv_path, ", ".join(_MANIFEST_COLUMNS))
    extra = [line for line, r in zip(lines, raw) if None in r]  # values beyond the header come back under the key None
    rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k is not None} for r in raw]
    no_path = [line for line, r in zip(lines, rows) if not r.get("path")]
    rows = [r for r in rows if r.get("path")]
    if not rows:
        raise FeatxError(f"CSV manifest '{csv_path}' lists no images")
    for at, what in ((extra, "have more values than the header (the extra values are ignored)"),
                     (no_path, "have an empty path and are skipped")):
        if at:
            _logger.warning("%d rows of '%s' %s: line%s %s", len(at), csv_path, what, "s" if len(at) > 1 else "",
                            _first([str(n) for n in at], 5))
    if "label" in fields and (unlabeled := sum(1 for r in rows if not r["label"])):
        _logger.warning("%d rows of '%s' have no label and are kept as unlabeled", unlabeled, csv_path)
    _check_relative_paths(csv_path, [r["path"] for r in rows])
    splits = [r.get("split") or "train" for r in rows]
    _warn_odd_split_names(csv_path, splits)
    names = sorted({r["label"] for r in rows if r.get("label")}, key=natural_key)
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


def natural_key(s: str):
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


def digits_source() -> ImageSource:
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


def fashion_mnist_source(directory: str) -> ImageSource:
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
