"""The images a run trains and is scored on, and the loaders that feed them with their labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import FeatxError
from ..loading import ImageDataset
from ..sources import ImageSource
from ..splits import choose_splits, stratified_holdout
from ..configs import FinetuneConfig

__all__ = ["RunImages", "choose_images", "LabelledBatches", "make_loader"]


@dataclass
class RunImages:
    """Which images train, choose the epoch (validation) and are scored once at the end (test)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    eval_split: str  # the test split's name, or 'holdout'
    eval_description: str
    val_description: str


def choose_images(src: ImageSource, config: FinetuneConfig) -> RunImages:
    """Training, validation and test image indices.

    The splits follow the rule ``featx fit-head`` follows (:func:`featx.splits.choose_splits`); without a test
    split the test images are a held-out part of the training split drawn by the same function from the same
    labels, so a fine-tune and a head fitted on the same source are scored on the same images. The validation
    images, which choose the epoch, are a seeded stratified part of what remains for training: the test images
    are never used to choose anything.
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
        test, split, description = np.flatnonzero((splits == eval_name) & labeled), eval_name, eval_name
    else:
        tr, te = stratified_holdout(src.labels[train], config.holdout, config.seed)
        train, test, split = train[tr], train[te], "holdout"
        description = f"held-out {config.holdout:.0%} of '{train_name}', seed {config.seed}"
    if len(np.unique(src.labels[train])) < 2:
        raise FeatxError(f"the training images of '{src.name}' ({len(train)}) are of fewer than 2 classes; fine-tuning needs at least 2")
    if len(test) == 0:
        raise FeatxError(f"the '{eval_name}' split of '{src.name}' has no labeled images to evaluate on; pass --eval-split")
    if len(train) < 4:
        raise FeatxError(f"{len(train)} training images are too few to hold out validation images; use more images")
    tr, va = stratified_holdout(src.labels[train], config.val_fraction, config.seed + 1)
    val_description = f"held-out {config.val_fraction:.0%} of the training images, seed {config.seed + 1}"
    return RunImages(train[tr], train[va], test, split, description, val_description)


class LabelledBatches:
    """Collate :class:`~featx.loading.ImageDataset` items into ``(x or None, y, image indices, [(index, reason)])``."""

    def __init__(self, labels: np.ndarray):
        self.labels = labels

    def __call__(self, batch):
        ok = [b for b in batch if b[1] is not None]
        x = torch.stack([b[1] for b in ok]) if ok else None
        y = torch.tensor([int(self.labels[b[0]]) for b in ok], dtype=torch.long)
        return x, y, [b[0] for b in ok], [(b[0], b[2]) for b in batch if b[1] is None]


def training_transform(data_config: dict, eval_tf, augment: str):
    """The training transform for ``augment``: none (the eval transform), flip (a horizontal flip, then the eval transform),
    crop (a random resized crop of at least 35% of the image, 3/4..4/3 aspect, and a flip: no colour jitter) or timm
    (timm's ImageNet training transform: crops down to 8% of the image, colour jitter)."""
    from timm.data import create_transform
    from torchvision import transforms

    if augment == "none":
        return eval_tf
    if augment == "flip":
        return transforms.Compose([transforms.RandomHorizontalFlip(), *eval_tf.transforms])
    if augment == "crop":
        return create_transform(**data_config, is_training=True, scale=(0.35, 1.0), color_jitter=0.0)
    return create_transform(**data_config, is_training=True)


def make_loader(src: ImageSource, indices: np.ndarray, transform, *, batch_size: int, workers: int, device: torch.device,
                shuffle: bool, generator: torch.Generator | None = None) -> DataLoader:
    """Every image is loaded every epoch (no drop_last), so unreadable ones are all found and counted.

    A loader without ``generator`` gets a fixed one of its own: iterating it then never draws from torch's global
    random state, so scoring validation or test images cannot change the augmentations of the training that follows.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return DataLoader(ImageDataset(src, transform, indices), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=workers, collate_fn=LabelledBatches(src.labels), pin_memory=device.type == "cuda")
