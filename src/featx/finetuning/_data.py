"""The images a run trains and is scored on, and the loaders that feed them with their labels."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import FeatxError
from ..loading import ImageDataset
from ..sources import ImageSource
from ..splits import choose_splits, stratified_holdout
from ..configs import FinetuneConfig

__all__ = ["choose_images", "LabelledBatches", "make_loader"]


def choose_images(src: ImageSource, config: FinetuneConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """Training and evaluation image indices, and a description of the evaluation images.

    The splits follow the rule ``featx fit-head`` follows (:func:`featx.splits.choose_splits`), and
    without an evaluation split the held-out part is drawn by the same function from the same
    labels, so a fine-tune and a head fitted on the same source are scored on the same images
    (when none is unreadable).
    """
    splits = np.asarray(src.splits)
    labeled = src.labels >= 0
    labelled_splits = {s for s in src.split_names if (labeled & (splits == s)).any()}
    train_name, eval_name = choose_splits(src.split_names, train=config.train_split, test=config.eval_split,
                                          labelled=labelled_splits, where=f"source '{src.name}'",
                                          options=("--train-split", "--eval-split"))
    train = np.flatnonzero((splits == train_name) & labeled)
    if len(train) == 0:
        raise FeatxError(f"the '{train_name}' split of '{src.name}' has no labeled images; fine-tuning needs labels")
    if eval_name is not None:
        test = np.flatnonzero((splits == eval_name) & labeled)
        description = eval_name
    else:
        tr, te = stratified_holdout(src.labels[train], config.holdout, config.seed)
        train, test = train[tr], train[te]
        description = f"held-out {config.holdout:.0%} of '{train_name}', seed {config.seed}"
    if len(np.unique(src.labels[train])) < 2:
        raise FeatxError(f"the training images of '{src.name}' ({len(train)}) are of fewer than 2 classes; fine-tuning needs at least 2")
    if len(test) == 0:
        raise FeatxError(f"the '{eval_name}' split of '{src.name}' has no labeled images to evaluate on; pass --eval-split")
    return train, test, description


class LabelledBatches:
    """Collate :class:`~featx.loading.ImageDataset` items into ``(x or None, y, image indices, [(index, reason)])``."""

    def __init__(self, labels: np.ndarray):
        self.labels = labels

    def __call__(self, batch):
        ok = [b for b in batch if b[1] is not None]
        x = torch.stack([b[1] for b in ok]) if ok else None
        y = torch.tensor([int(self.labels[b[0]]) for b in ok], dtype=torch.long)
        return x, y, [b[0] for b in ok], [(b[0], b[2]) for b in batch if b[1] is None]


def make_loader(src: ImageSource, indices: np.ndarray, transform, *, batch_size: int, workers: int, device: torch.device,
                shuffle: bool, generator: torch.Generator | None = None) -> DataLoader:
    """Every image is loaded every epoch (no drop_last), so unreadable ones are all found and counted."""
    return DataLoader(ImageDataset(src, transform, indices), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=workers, collate_fn=LabelledBatches(src.labels), pin_memory=device.type == "cuda")
