"""Decoding an image source into batches: DataLoader plumbing shared by extraction, prediction and fine-tuning.

An unreadable image never stops a batch: it comes back as ``(index, None, reason)`` so the
caller can record it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from torch.utils.data import DataLoader, Dataset

from .errors import BadImage
from .sources import ImageSource

__all__ = ["ImageDataset", "fixed_grid_loader", "as_list"]


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


def as_list(batch: list) -> list:
    """A collate function that keeps the batch as the list of dataset items."""
    return batch


def fixed_grid_loader(source: ImageSource, prepare: Callable, *, start: int, batch_size: int, workers: int) -> DataLoader:
    """Batches ``[start, start + batch_size), ...`` over ``source`` in order, as lists of :class:`ImageDataset` items.

    The grid does not depend on where a run starts, so a resumed extraction computes exactly the
    batches an uninterrupted one would.
    """
    n = len(source)
    return DataLoader(
        ImageDataset(source, prepare),
        batch_sampler=[list(range(s, min(s + batch_size, n))) for s in range(start, n, batch_size)],
        num_workers=workers,
        collate_fn=as_list,
        prefetch_factor=4 if workers > 0 else None,
    )
