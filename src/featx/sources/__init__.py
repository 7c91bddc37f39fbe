"""Image sources: folders, CSV manifests, WebDataset tar shards and named datasets, as one ordered list of images.

Every source resolves to an :class:`ImageSource`: image identifiers, integer labels, split names
and class names, plus a way to load image ``i`` as an RGB PIL image (and the digest of the bytes it
came from), and each file's size and modification time. The order is deterministic (sorted paths,
shards in the order given, members in the order of their shard), so the same source always yields
the same image list and the same hash.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FeatxError
from ._files import FASHION_MNIST_DIR, digits_source, fashion_mnist_source, folder_source, manifest_source
from ._shards import SHARD_IMAGE_FIELDS, expand_braces, shard_paths, tar_source
from ._source import IMG_EXTENSIONS, UNLABELED, ImageSource, TarMembers, content_digest, images_source

__all__ = ["ImageSource", "TarMembers", "resolve_source", "images_source", "content_digest", "expand_braces",
           "IMG_EXTENSIONS", "SHARD_IMAGE_FIELDS", "FASHION_MNIST_DIR", "UNLABELED"]


def resolve_source(spec: str | os.PathLike, *, split: str | None = None) -> ImageSource:
    """Turn a command-line SOURCE into an :class:`ImageSource`.

    Accepts a folder (``<class>/<image>`` or ``<split>/<class>/<image>``), a CSV manifest with
    columns ``path,label[,split]``, WebDataset tar shards (a ``.tar`` file, a folder of them or a
    brace pattern such as ``shards/train-{000000..000127}.tar``), ``fashion-mnist[:DIR]`` or
    ``digits``. ``split`` puts every image in that split (default: from the folders, the CSV's
    split column or the shard names, else 'train').
    """
    src = _resolve(str(spec), split)
    if split is not None and src.tar is None:
        src.splits = [split] * len(src)
    return src


def _resolve(text: str, split: str | None) -> ImageSource:
    if text == "digits":
        return digits_source()
    if text == "fashion-mnist" or text.startswith("fashion-mnist:"):
        return fashion_mnist_source(text.partition(":")[2] or FASHION_MNIST_DIR)
    shards = shard_paths(text)
    if shards is not None:
        return tar_source(shards, text, split)
    path = Path(text)
    if not path.exists():
        raise FeatxError(f"source '{text}' does not exist (expected a folder, a .csv manifest, .tar shards, 'digits' or 'fashion-mnist[:DIR]')")
    if path.is_dir():
        return folder_source(path)
    if path.suffix.lower() == ".csv":
        return manifest_source(path)
    raise FeatxError(f"source '{text}' is a file but not a .csv manifest or a .tar shard; pass an image folder, "
                     "a CSV with columns path,label[,split] or WebDataset .tar shards")
