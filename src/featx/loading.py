"""Decoding an image source into batches: DataLoader plumbing shared by extraction, prediction and fine-tuning.

An unreadable image never stops a batch: it comes back as ``(index, None, reason)`` so the
caller can record it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset

from .errors import BadImage
from .sources import ImageSource

__all__ = ["ImageDataset", "SharedDecodeDataset", "fixed_grid_loader", "as_list"]


class ImageDataset(Dataset):
    """Image ``indices[k]`` of ``source`` (all images without ``indices``), passed through ``prepare``.

    Items are ``(image index, prepare(image), None)``, or ``(image index, None, reason)`` when the
    image cannot be decoded.
    """

    def __init__(self, source: ImageSource, prepare: Callable, indices: np.ndarray | None = None):
        self.source, self.prepare, self.indices = source, prepare, indices

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def __getitem__(self, k: int):
        i = k if self.indices is None else int(self.indices[k])
        try:
            return i, self.prepare(self.source.load(i)), None
        except BadImage as e:
            return i, None, str(e)


class SharedDecodeDataset(Dataset):
    """Each image of ``source`` decoded once and handed to every one of ``prepares`` (one per backbone).

    Items are ``(image index, [prepare(image) for each prepare], None, digest)``, or
    ``(image index, None, reason, digest)`` when the image cannot be decoded; ``digest`` is the
    content digest of the bytes the image came from (None when ``digests`` is off or they could not be read).
    """

    def __init__(self, source: ImageSource, prepares: Sequence[Callable], digests: bool = False):
        self.source, self.prepares, self.digests = source, list(prepares), digests

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        if self.digests:
            img, digest, reason = self.source.load_with_digest(i)
        else:
            digest = None
            try:
                img, reason = self.source.load(i), None
            except BadImage as e:
                img, reason = None, str(e)
        if img is None:
            return i, None, reason, digest
        try:
            return i, [prepare(img) for prepare in self.prepares], None, digest
        except BadImage as e:
            return i, None, str(e), digest


def as_list(batch: list) -> list:
    """A collate function that keeps the batch as the list of dataset items."""
    return batch


def fixed_grid_loader(source: ImageSource, prepare: Callable | Sequence[Callable], *, start: int, batch_size: int, workers: int,
                      digests: bool = False) -> DataLoader:
    """Batches ``[start, start + batch_size), ...`` over ``source`` in order, as lists of dataset items.

    One ``prepare``: :class:`ImageDataset` items; a list of them (several backbones) or ``digests``:
    :class:`SharedDecodeDataset` items. The grid does not depend on where a run starts, so a
    resumed extraction computes exactly the batches an uninterrupted one would.
    """
    n = len(source)
    shared = not callable(prepare) or digests
    return DataLoader(
        SharedDecodeDataset(source, [prepare] if callable(prepare) else prepare, digests) if shared else ImageDataset(source, prepare),
        batch_sampler=[list(range(s, min(s + batch_size, n))) for s in range(start, n, batch_size)],
        num_workers=workers,
        collate_fn=as_list,
        prefetch_factor=4 if workers > 0 else None,
    )
