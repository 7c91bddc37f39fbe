"""The images a run trains and is scored on, and the loaders that feed them with their labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import FeatxError
from ..loading import ImageDataset
from ..sources import ImageSource
from ..splits import choose_splits, holdout_per_class, stratified_holdout
from ..configs import FinetuneConfig

__all__ = ["RunImages", "choose_images", "validation_counts", "LabelledBatches", "make_loader", "MIN_TRAIN_PER_CLASS"]


@dataclass
class RunImages:
    """Which images train, choose the epoch (validation) and are scored once at the end (test)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    eval_split: str  # the test split's name, or 'holdout'
    eval_description: str
    val_description: str


# Every class needs this many training images: two to train the probe (and its C, by cross-validation) and one to
# validate; without a test split, one more is held out to test.
MIN_TRAIN_PER_CLASS = 3


def choose_images(src: ImageSource, config: FinetuneConfig) -> RunImages:
    """Training, validation and test image indices.

    The splits follow the rule ``featx fit-head`` follows (:func:`featx.splits.choose_splits`); without a test
    split the test images are a held-out part of the training split drawn by the same function from the same
    labels, so a fine-tune and a head fitted on the same source are scored on the same test images. The validation
    images, which choose everything a run chooses, are a seeded part of what remains for training, sized per class by
    :func:`validation_counts`: the test images are never used to choose anything.
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
    _check_images_per_class(src, train, train_name, holdout=eval_name is None)
    if eval_name is not None:
        test, split, description = np.flatnonzero((splits == eval_name) & labeled), eval_name, eval_name
    else:
        tr, te = stratified_holdout(src.labels[train], config.holdout, config.seed)
        train, test, split = train[tr], train[te], "holdout"
        description = f"held-out {config.holdout:.0%} of '{train_name}', seed {config.seed}"
    if len(test) == 0:
        raise FeatxError(f"the '{eval_name}' split of '{src.name}' has no labeled images to evaluate on; pass --eval-split")
    counts = validation_counts(src.labels[train], config)
    tr, va = holdout_per_class(src.labels[train], counts, config.seed + 1)
    val_description = (f"{len(va)} of the {len(train)} training images, seed {config.seed + 1}: {config.val_fraction:.0%} of each "
                       f"class, at least {config.val_min_per_class} (at most a third of the class), {config.val_max} in all at most")
    return RunImages(train[tr], train[va], test, split, description, val_description)


def _check_images_per_class(src: ImageSource, train: np.ndarray, train_name: str, *, holdout: bool) -> None:
    """Refuse a training split in which some class has too few images to train, validate (and, with no test split, test)."""
    need = MIN_TRAIN_PER_CLASS + int(holdout)
    present = np.unique(src.labels[src.labels >= 0])
    if len(present) < 2:
        raise FeatxError(f"the images of '{src.name}' are of fewer than 2 classes; fine-tuning needs at least 2")
    counts = np.bincount(src.labels[train], minlength=int(present.max()) + 1)
    short = [(src.class_names[c], int(counts[c])) for c in present if counts[c] < need]
    if short:
        name, have = min(short, key=lambda t: t[1])
        parts = "2 to train, 1 to validate" + (", 1 held out to test (or give a test split)" if holdout else "")
        raise FeatxError(f"class '{name}' has {have} image{'s' if have != 1 else ''} in the '{train_name}' split"
                         + (f" ({len(short)} classes have fewer than {need})" if len(short) > 1 else "")
                         + f"; fine-tuning needs at least {need} images per class ({parts}); add images to those classes")


def validation_counts(y: np.ndarray, config: FinetuneConfig) -> dict[int, int]:
    """Validation images per class: ``val_fraction`` of the class, raised to ``val_min_per_class`` (but to no more than a
    third of the class), at least 1 and leaving 2 to train; scaled down to ``val_max`` in all.

    A floor, because the choices made on validation (epoch, interpolation, probe or fine-tune) are only as sure as its
    size: 10% of 245 images is 25, where one image is 4 points. A ceiling, because on large sets more validation
    images buy little certainty and cost an evaluation pass per candidate.
    """
    classes, n = np.unique(y, return_counts=True)
    want = np.maximum(np.ceil(config.val_fraction * n), np.minimum(config.val_min_per_class, n // 3))
    want = np.clip(want, 1, n - 2).astype(np.int64)
    if want.sum() > config.val_max:
        want = np.maximum(1, np.floor(want * config.val_max / want.sum())).astype(np.int64)
    return {int(c): int(k) for c, k in zip(classes, want)}


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
