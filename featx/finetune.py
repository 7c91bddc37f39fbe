"""Fine-tuning a timm backbone end to end, reported in the same schema as the frozen heads.

A run trains ``backbone + new classifier`` on the training split of an image source and
evaluates on the test/val split (or a seeded, stratified held-out part of the training split)
after every epoch. Everything a run needs to continue lives in ``RUN_DIR``:

* ``run.json``      what the run is (config, source fingerprint, class names); a folder that
                    holds one is refused unless ``resume`` or ``overwrite``;
* ``last.pt``       model, optimizer, scheduler, grad scaler, epoch, RNG states (torch, CUDA,
                    Python, NumPy and the DataLoader's sampler generator) after the last
                    finished epoch: ``resume`` continues from it and ends where an
                    uninterrupted run would (same batches, same augmentations, same updates);
* ``best.pt``       the model of the epoch with the best evaluation accuracy;
* ``metrics.json``  final metrics (``featx fit-head --json`` schema) and per-epoch history;
* ``export/``       ``config.json`` + ``model.safetensors`` (timm's own format): load with
                    ``timm.create_model('local-dir:RUN_DIR/export', pretrained=True)``.

``best.pt`` and ``last.pt`` keep the model under a ``model`` key with timm's parameter names, so
``featx extract --weights RUN_DIR/best.pt`` caches embeddings of the fine-tuned backbone.

Stages (``freeze='stages:N'``) are timm's own coarse parameter groups
(``model.group_matcher(coarse=True)``, the grouping timm uses for layer-wise lr decay): the stem
first, then one group per stage (ResNet ``layer1..4``, EfficientNet ``blocks.0..6``, one group
per ViT block). Final convs/norms that timm attaches to the last block (EfficientNet
``conv_head``/``bn2``, ViT ``norm``) belong to the last stage, because ``featx extract``'s
frozen features are taken after them. The head is the classifier plus anything timm leaves
after the last block (ViT ``fc_norm``, ConvNeXt ``head.norm``); it is always trained.
``stages:N`` trains the last N groups; frozen modules also stay in eval mode (BatchNorm
statistics and drop-path untouched), so ``freeze='all'`` is exactly a linear probe with
augmentation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import timm
import torch
from timm.data import create_transform, resolve_model_data_config
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import __version__
from .backbones import create_backbone
from .errors import BadImage, FeatxError
from .extract import autocast_context, default_workers, resolve_device, resolve_precision
from .head_io import TEST_SPLIT_NAMES, holdout_split, load_head, write_text_atomic
from .metrics import classification_metrics
from .sources import ImageSource, resolve_source

__all__ = [
    "FinetuneConfig", "FinetuneResult", "finetune", "model_stages", "apply_freeze", "parse_freeze",
    "linear_head_from_dir", "export_model", "build_optimizer", "RUN_FILE",
]

_logger = logging.getLogger(__name__)
RUN_FILE = "run.json"
_RUN_FILES = (RUN_FILE, "last.pt", "best.pt", "metrics.json", "last.pt.tmp", "best.pt.tmp")
# Settings that may differ between an interrupted run and its resumption without changing results.
_NOT_IDENTITY = ("device", "workers", "progress", "resume", "overwrite", "stop_after")
_SYNC_EVERY = 20  # training steps between reads of the running loss (each read waits for the device)


@dataclass
class FinetuneConfig:
    """Options of ``featx finetune``; ``None`` means the model's, source's or machine's default."""

    model: str  # timm model name
    pretrained: bool = False  # timm hub weights (needs internet)
    weights: str | None = None  # local backbone checkpoint (.pth/.pt/.safetensors)
    img_size: int | None = None  # input resolution (default: the model's)
    freeze: str = "none"  # all | stages:N | none
    init_head: str | None = None  # HEAD_DIR of a linear head fitted by `featx fit-head` on this backbone's features
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3  # peak AdamW learning rate of the head; backbone layers get lr * layer_decay ** depth
    weight_decay: float = 0.05  # AdamW weight decay (not applied to biases, norms, tokens)
    layer_decay: float | None = 0.8  # layer-wise lr decay (timm's grouping); None or 1: same lr everywhere
    warmup: float = 0.1  # fraction of all optimizer steps spent warming up linearly from 0
    min_lr_ratio: float = 0.0  # cosine decay ends at lr * min_lr_ratio
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0  # max gradient norm; None: no clipping
    augment: bool = True  # timm's training transform (create_transform(is_training=True)); False: eval transform
    train_split: str = "train"
    eval_split: str | None = None  # None: test/val/valid if present, else a held-out part of the training split
    holdout: float = 0.2  # held-out fraction when the source has no evaluation split
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda[:N]
    precision: str = "auto"  # auto (bf16/fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    channels_last: bool = True
    workers: int | None = None  # DataLoader workers; None: 1 on CPU, up to 16 on CUDA
    export: str = "last"  # which weights go to RUN_DIR/export: last | best | none
    resume: bool = False  # continue the run in RUN_DIR from last.pt
    overwrite: bool = False  # replace the run in RUN_DIR
    progress: bool = True
    stop_after: int | None = None  # end this call once this many epochs are done (an interruption; resume continues)


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced."""

    out: Path
    metrics: dict  # final metrics, `featx fit-head --json` schema plus fine-tuning fields
    history: list[dict] = field(default_factory=list)  # one entry per epoch
    epochs_done: int = 0
    finished: bool = True  # False when stopped early by stop_after
    resumed_from: int = 0  # epochs already done when this call started
    export_dir: Path | None = None
    load_notice: str = ""

    def to_json(self) -> str:
        return json.dumps(self.metrics, sort_keys=True)

    def summary(self) -> str:
        m = self.metrics
        state = "finished" if self.finished else f"stopped after epoch {self.epochs_done} of {m['epochs']} (rerun with --resume)"
        resumed = f", resumed after epoch {self.resumed_from}" if self.resumed_from else ""
        lines = [
            f"Fine-tuned {m['model']} ({m['head']}) {state}{resumed}: {m['n_train']} training images, "
            f"evaluated on {m['n_test']} ({m['eval_split']}); {m['n_skipped']} unreadable images skipped.",
            f"  accuracy {m['accuracy']:.4f}  balanced accuracy {m['balanced_accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}"
            + (f"  top-5 {m['top5_accuracy']:.4f}" if "top5_accuracy" in m else ""),
            f"  best accuracy {m['best_accuracy']:.4f} at epoch {m['best_epoch']}; "
            f"training {m['fit_seconds']:.1f} s, wall {m['wall_seconds']:.1f} s on {m['device']} ({m['precision']}); "
            f"{m['trainable_params']:,} of {m['total_params']:,} parameters trained",
            f"  run in {self.out}" + (f"; timm export in {self.export_dir}" if self.export_dir else ""),
        ]
        return "\n".join(lines)


# -- freezing ----------------------------------------------------------------------------------
def parse_freeze(spec: str) -> tuple[str, int]:
    """``'all' | 'none' | 'stages:N'`` -> (mode, N)."""
    text = str(spec).strip().lower()
    if text in ("all", "none"):
        return text, 0
    if text.startswith("stages:"):
        n = text.partition(":")[2]
        if n.isdigit():
            return "stages", int(n)
    raise FeatxError(f"bad --freeze '{spec}'; use all (head only), stages:N (also the last N stages) or none (everything)")


def _classifier_names(model: torch.nn.Module) -> list[str]:
    classifier = model.get_classifier()
    if isinstance(classifier, str):
        classifier = model.get_submodule(classifier)
    for prefix, module in model.named_modules():
        if module is classifier:
            return [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]
    return []


def model_stages(model: torch.nn.Module) -> tuple[list[list[str]], list[str]]:
    """Parameter names per stage (stem first, last stage last) and the head's parameter names.

    Stages are timm's coarse parameter groups (see the module docstring for the definition).
    """
    if not hasattr(model, "group_matcher"):
        raise FeatxError(f"'{type(model).__name__}' defines no stage grouping (timm group_matcher); use --freeze all or none")
    from timm.models import group_parameters

    names = [n for n, _ in model.named_parameters()]
    head = set(_classifier_names(model))
    groups = group_parameters(model, model.group_matcher(coarse=True))
    ordered = [list(groups[k]) for k in sorted(groups)]
    if ordered and head & set(ordered[-1]):
        head |= set(ordered[-1])  # everything timm leaves unmatched after the last block
        ordered = ordered[:-1]
    stages = [g for g in ([n for n in grp if n not in head] for grp in ordered) if g]
    assert sum(map(len, stages)) + len(head) == len(names), "every parameter belongs to one stage or the head"
    return stages, [n for n in names if n in head]


def apply_freeze(model: torch.nn.Module, spec: str) -> list[str]:
    """Set ``requires_grad`` for ``spec``; returns the trainable parameter names."""
    mode, n = parse_freeze(spec)
    if mode == "none":
        trainable = {name for name, _ in model.named_parameters()}
    else:
        if mode == "stages" or hasattr(model, "group_matcher"):
            stages, head = model_stages(model)
        else:
            stages, head = [], _classifier_names(model)
        if n > len(stages):
            raise FeatxError(f"--freeze stages:{n} asks for more stages than '{type(model).__name__}' has "
                             f"({len(stages)}, stem included); use stages:1..{len(stages)} or --freeze none")
        trainable = set(head) | {name for g in stages[len(stages) - n:] for name in g} if n else set(head)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return [name for name, _ in model.named_parameters() if name in trainable]


def _train_mode(model: torch.nn.Module) -> None:
    """Train mode, except modules whose parameters are all frozen (BatchNorm stats, drop-path stay put)."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


# -- initial head from `featx fit-head` --------------------------------------------------------
def linear_head_from_dir(head_dir: str | Path, class_names: list[str], num_features: int, *, model: str | None = None,
                         weights_sha256: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [K, D], bias [K]) of a linear head fitted by ``featx fit-head``, rows in ``class_names`` order.

    Linear preprocessing (standardising, PCA) is folded into the weights; heads that are not
    linear in the features (kNN, nearest class mean, RBF SVM, MLP, L2 normalisation) are refused.
    A head fitted on another model's features is refused; on other weights of the same model,
    a warning.
    """
    loaded = load_head(head_dir)
    meta, backbone = loaded.meta, loaded.meta.get("backbone") or {}
    if model is not None and backbone.get("model") not in (None, model):
        raise FeatxError(f"--init-head '{head_dir}' was fitted on features of '{backbone.get('model')}', not '{model}'; "
                         f"fit a head on '{model}' features (featx extract, then featx fit-head)")
    if weights_sha256 is not None and backbone.get("weights_sha256") not in (None, weights_sha256):
        _logger.warning("--init-head '%s' was fitted on features of other weights of this model; it is a weaker start", head_dir)
    weight, bias, classes = heads_linear_map(loaded.pipeline)
    names = list(meta.get("class_names") or class_names)
    head_names = [names[int(c)] for c in classes]
    dim = int(meta.get("feature_dim") or weight.shape[1])
    if dim != num_features or weight.shape[1] != num_features:
        raise FeatxError(f"--init-head '{head_dir}' was fitted on {dim}-dimensional features but this backbone gives "
                         f"{num_features}; fit the head on features of the same --model")
    missing = sorted(set(class_names) - set(head_names))
    if missing or len(head_names) != len(class_names):
        raise FeatxError(f"--init-head '{head_dir}' knows {len(head_names)} classes ({', '.join(head_names[:5])}...), the source has "
                         f"{len(class_names)} ({', '.join(class_names[:5])}...)"
                         + (f"; missing {', '.join(missing[:5])}" if missing else "")
                         + ". Fit the head on features of this source, with every class in its training split")
    order = [head_names.index(c) for c in class_names]
    return torch.as_tensor(weight[order], dtype=torch.float32), torch.as_tensor(bias[order], dtype=torch.float32)


def heads_linear_map(head) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W [K, D], b [K], class labels [K]) with ``logits = x @ W.T + b`` on raw features."""
    steps = [s for _, s in head.steps] if hasattr(head, "steps") else [head]
    *transforms, final = steps
    if hasattr(final, "coef_") and hasattr(final, "intercept_"):  # scikit-learn linear models and featx's torch-linear
        W = np.atleast_2d(np.asarray(final.coef_, dtype=np.float64))
        b = np.atleast_1d(np.asarray(final.intercept_, dtype=np.float64))
    else:
        raise FeatxError(f"--init-head needs a linear head (logreg, linear-svm, ridge or torch-linear); "
                         f"'{type(final).__name__}' is not linear in the features")
    classes = np.asarray(getattr(final, "classes_", np.arange(max(2, W.shape[0]))))
    if W.shape[0] == 1 and len(classes) == 2:  # binary: one score s -> logits (-s/2, s/2), same softmax as sigmoid(s)
        W, b = np.concatenate([-W / 2, W / 2]), np.concatenate([-b / 2, b / 2])
    # fold preprocessing, last step first: W x' + b with x' = A x + c  ->  (W A) x + (W c + b)
    for t in reversed(transforms):
        A, c = _affine(t, W.shape[1])
        W, b = W @ A, W @ c + b
    return W, b, classes


def _affine(t, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``t.transform(x) == A @ x + c`` for linear scikit-learn transformers."""
    name = type(t).__name__
    if t is None or t == "passthrough":
        return np.eye(dim), np.zeros(dim)
    if name == "StandardScaler":
        n = int(t.n_features_in_)
        scale = np.asarray(t.scale_, dtype=np.float64) if t.scale_ is not None else np.ones(n)
        mean = np.asarray(t.mean_, dtype=np.float64) if t.mean_ is not None and t.with_mean else np.zeros(n)
        return np.diag(1.0 / scale), -mean / scale
    if name == "PCA":
        comp = np.asarray(t.components_, dtype=np.float64)
        if t.whiten:
            comp = comp / np.sqrt(np.asarray(t.explained_variance_, dtype=np.float64))[:, None]
        return comp, -comp @ np.asarray(t.mean_, dtype=np.float64)
    raise FeatxError(f"--init-head cannot fold a '{name}' step into a linear classifier (only standardising and PCA are linear); "
                     "fit the head without it")


# -- data ------------------------------------------------------------------------------------
class _Images(Dataset):
    """(index, tensor or None, label, reason) for image ``indices[k]`` of a source."""

    def __init__(self, source: ImageSource, indices: np.ndarray, transform):
        self.source, self.indices, self.transform = source, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        try:
            return i, self.transform(self.source.load(i)), int(self.source.labels[i]), None
        except BadImage as e:
            return i, None, int(self.source.labels[i]), str(e)


def _collate(batch):
    ok = [b for b in batch if b[1] is not None]
    x = torch.stack([b[1] for b in ok]) if ok else None
    y = torch.tensor([b[2] for b in ok], dtype=torch.long)
    return x, y, [b[0] for b in ok], [(b[0], b[3]) for b in batch if b[1] is None]


def _split(src: ImageSource, config: FinetuneConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """Training and evaluation image indices, and a description of the evaluation images.

    The evaluation split is picked as ``featx fit-head`` picks its test split, and without one
    the held-out part is drawn by the same function from the same labels, so a fine-tune and a
    head fitted on the same source are scored on the same images (when none is unreadable).
    """
    splits = np.asarray(src.splits)
    names = src.split_names
    if config.train_split not in names:
        raise FeatxError(f"source '{src.name}' has no '{config.train_split}' split (it has {', '.join(names)}); pass --train-split")
    labeled = src.labels >= 0
    train = np.flatnonzero((splits == config.train_split) & labeled)
    if len(train) == 0:
        raise FeatxError(f"the '{config.train_split}' split of '{src.name}' has no labeled images; fine-tuning needs labels")
    eval_name = config.eval_split
    if eval_name is None:
        lower = {n.lower(): n for n in names if n != config.train_split}
        eval_name = next((lower[n] for n in TEST_SPLIT_NAMES if n in lower), None)
    elif eval_name not in names:
        raise FeatxError(f"source '{src.name}' has no '{eval_name}' split (it has {', '.join(names)}); pass another --eval-split")
    elif eval_name == config.train_split:
        raise FeatxError(f"--train-split and --eval-split are both '{eval_name}'; leave --eval-split out to hold out part of the training split")
    if eval_name is not None:
        test = np.flatnonzero((splits == eval_name) & labeled)
        description = eval_name
    else:
        if not 0 < config.holdout < 1:
            raise FeatxError(f"--holdout must be between 0 and 1, got {config.holdout}")
        tr, te = holdout_split(src.labels[train], config.holdout, config.seed)
        train, test = train[tr], train[te]
        description = f"held-out {config.holdout:.0%} of '{config.train_split}', seed {config.seed}"
    if len(np.unique(src.labels[train])) < 2:
        raise FeatxError(f"the training images of '{src.name}' ({len(train)}) are of fewer than 2 classes; fine-tuning needs at least 2")
    if len(test) == 0:
        raise FeatxError(f"the '{eval_name}' split of '{src.name}' has no labeled images to evaluate on; pass --eval-split")
    return train, test, description


# -- run directory ---------------------------------------------------------------------------
def _identity(config: FinetuneConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k not in _NOT_IDENTITY}


def _prepare_run_dir(out: Path, config: FinetuneConfig, run_info: dict) -> bool:
    """Create or check RUN_DIR; True when a run should continue from ``last.pt``."""
    if out.exists() and not out.is_dir():
        raise FeatxError(f"--out '{out}' is a file; pass a folder for the run")
    existing = out / RUN_FILE
    if existing.is_file():
        if config.overwrite:
            for name in _RUN_FILES:
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "export", ignore_errors=True)
        elif not config.resume:
            raise FeatxError(f"--out '{out}' holds another fine-tuning run; pass --resume to continue it or --overwrite to replace it")
        else:
            try:
                old = json.loads(existing.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise FeatxError(f"cannot read '{existing}' ({e}); pass --overwrite to start the run again") from None
            diff = [k for k in ("config", "source_fingerprint", "class_names") if old.get(k) != run_info[k]]
            if diff:
                detail = [f"{k}: {old['config'].get(k)!r} -> {v!r}" for k, v in run_info["config"].items()
                          if "config" in diff and old.get("config", {}).get(k) != v][:4] or diff
                raise FeatxError(f"--resume: the run in '{out}' was made with other settings ({'; '.join(detail)}); "
                                 "rerun with the original options, or pass --overwrite to start over")
            return (out / "last.pt").is_file()
    elif out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise FeatxError(f"--out '{out}' is not empty and holds no featx run; choose a new or empty folder (or --overwrite to write into it)")
    if config.resume:
        _logger.info("no run to resume in '%s'; starting a new one", out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / RUN_FILE, json.dumps(run_info, indent=2, sort_keys=True))
    except OSError as e:
        raise FeatxError(f"cannot write to --out '{out}': {e}") from None
    return False


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# -- RNG state -------------------------------------------------------------------------------
def _rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "sampler": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    generator.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# -- schedule --------------------------------------------------------------------------------
class WarmupCosine:
    """lr multiplier: linear warm-up from 0 over ``warmup`` steps, then cosine decay to ``min_ratio``."""

    def __init__(self, total: int, warmup: int, min_ratio: float = 0.0):
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def build_optimizer(model: torch.nn.Module, config: FinetuneConfig, total_steps: int):
    """AdamW over the trainable parameters (timm's layer-wise lr decay groups) and its warm-up + cosine schedule.

    Group ``g`` gets ``lr * lr_scale_g``; timm's ``lr_scale`` is ``layer_decay ** (depth from the head)``
    over its fine parameter groups, so the head trains at ``lr`` and the stem slowest.
    """
    from timm.optim import create_optimizer_v2

    layer_decay = config.layer_decay if config.layer_decay not in (None, 1.0) else None
    optimizer = create_optimizer_v2(model, opt="adamw", lr=config.lr, weight_decay=config.weight_decay, layer_decay=layer_decay)
    for group in optimizer.param_groups:
        group["lr"] = config.lr * group.get("lr_scale", 1.0)
    schedule = WarmupCosine(total_steps, int(round(config.warmup * total_steps)), config.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# -- the run ---------------------------------------------------------------------------------
def _validate(config: FinetuneConfig) -> None:
    parse_freeze(config.freeze)
    for name in ("epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise FeatxError(f"--{name.replace('_', '-')} must be at least 1")
    if not config.lr > 0:
        raise FeatxError(f"--lr must be positive, got {config.lr}")
    if config.layer_decay is not None and not 0 < config.layer_decay <= 1:
        raise FeatxError(f"--layer-decay must be in (0, 1], got {config.layer_decay}")
    if not 0 <= config.warmup < 1:
        raise FeatxError(f"--warmup is a fraction of the training steps in [0, 1), got {config.warmup}")
    if not 0 <= config.label_smoothing < 1:
        raise FeatxError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    if config.export not in ("last", "best", "none"):
        raise FeatxError(f"--export must be last, best or none, got '{config.export}'")
    if config.pretrained and config.weights:
        raise FeatxError("use either --pretrained or --weights, not both")


def finetune(source: str | ImageSource, config: FinetuneConfig, out: str | os.PathLike) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``source`` into the run folder ``out``."""
    t_start = time.perf_counter()
    _validate(config)
    out = Path(out)
    src = source if isinstance(source, ImageSource) else resolve_source(source)
    train_idx, test_idx, eval_name = _split(src, config)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    n_classes = len(src.class_names)

    model, info = create_backbone(config.model, pretrained=config.pretrained, weights=config.weights,
                                  img_size=config.img_size, seed=config.seed)
    num_features = info.num_features
    model.reset_classifier(n_classes)  # after loading: positional loading needs the headless model
    if config.init_head:
        weight, bias = linear_head_from_dir(config.init_head, src.class_names, num_features, model=config.model,
                                            weights_sha256=info.weights_sha256)
        classifier = model.get_classifier()
        if not isinstance(classifier, torch.nn.Linear) or tuple(classifier.weight.shape) != tuple(weight.shape):
            raise FeatxError(f"--init-head: '{config.model}' has no plain linear classifier of shape {tuple(weight.shape)} to initialise")
        with torch.no_grad():
            classifier.weight.copy_(weight)
            classifier.bias.copy_(bias)
    trainable = apply_freeze(model, config.freeze)

    data_config = resolve_model_data_config(model, args={"input_size": (3, config.img_size, config.img_size)} if config.img_size else None)
    eval_tf = create_transform(**data_config, is_training=False)
    train_tf = create_transform(**data_config, is_training=True) if config.augment else eval_tf

    run_info = {
        "featx_run": "finetune",
        "config": _identity(config),
        "source": src.name,
        "source_fingerprint": src.fingerprint(),
        "class_names": list(src.class_names),
        "weights_sha256": info.weights_sha256,
        "data_config": json.loads(json.dumps(data_config, default=list)),
        "train_transform": repr(train_tf),
        "eval_transform": repr(eval_tf),
        "featx_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": str(torch.__version__),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    resuming = _prepare_run_dir(out, config, run_info)

    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    workers = default_workers(device) if config.workers is None else config.workers
    generator = _seed_everything(config.seed)
    # every image is loaded every epoch (no drop_last), so unreadable ones are all found and counted
    train_loader = DataLoader(
        _Images(src, train_idx, train_tf), batch_size=config.batch_size, shuffle=True, generator=generator,
        num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda",
    )
    eval_loader = DataLoader(_Images(src, test_idx, eval_tf), batch_size=config.batch_size, shuffle=False,
                             num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * config.epochs

    optimizer, scheduler = build_optimizer(model, config, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    state = {"epoch": 0, "history": [], "best": None, "fit_seconds": 0.0, "wall_seconds": 0.0, "skipped": {}}
    if resuming:
        ckpt = _load_checkpoint(out / "last.pt")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"], generator)
        state = {k: ckpt[k] for k in state}
        _logger.info("resuming '%s' after epoch %d of %d", out, state["epoch"], config.epochs)
    resumed_from = state["epoch"]
    session_start = t_start
    wall_before = state["wall_seconds"]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _logger.info("%s: training %d parameter tensors (%s of %s values, freeze=%s) on %s (%s), %d steps per epoch",
                 config.model, len(trainable), f"{n_trainable:,}", f"{sum(p.numel() for p in model.parameters()):,}",
                 config.freeze, device, precision, steps_per_epoch)

    stop = config.epochs if config.stop_after is None else min(config.epochs, config.stop_after)
    try:
        for epoch in range(state["epoch"] + 1, stop + 1):
            t_epoch = time.perf_counter()
            train_stats = _train_epoch(model, train_loader, optimizer, scheduler, scaler, criterion, device, precision,
                                       config, epoch, state["skipped"])
            state["fit_seconds"] += time.perf_counter() - t_epoch
            metrics = _evaluate(model, eval_loader, criterion, device, precision, config, n_classes, state["skipped"])
            entry = {"epoch": epoch, **train_stats, **{f"eval_{k}": v for k, v in metrics.items()},
                     "lr": max(g["lr"] for g in optimizer.param_groups), "seconds": time.perf_counter() - t_epoch}
            state["history"].append(entry)
            is_best = state["best"] is None or metrics["accuracy"] > state["best"]["accuracy"]
            if is_best:
                state["best"] = {"epoch": epoch, "accuracy": metrics["accuracy"]}
            state["epoch"] = epoch
            state["wall_seconds"] = wall_before + time.perf_counter() - session_start
            model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            if is_best:
                _atomic_save({"model": model_state, "epoch": epoch, "metrics": metrics, "model_name": config.model,
                              "class_names": list(src.class_names), "featx_version": __version__}, out / "best.pt")
            _atomic_save({"model": model_state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict(), "rng": _rng_state(generator), "model_name": config.model,
                          "class_names": list(src.class_names), **state}, out / "last.pt")
            _logger.info("epoch %d/%d: train loss %.4f acc %.4f (%.1f img/s) | %s accuracy %.4f%s",
                         epoch, config.epochs, train_stats["train_loss"], train_stats["train_accuracy"],
                         train_stats["images_per_s"], eval_name, metrics["accuracy"], " (best)" if is_best else "")
    except torch.OutOfMemoryError:
        raise FeatxError(f"out of memory on {device} at batch size {config.batch_size}; rerun with a smaller --batch-size "
                         f"(e.g. {max(1, config.batch_size // 2)}) and --resume") from None
    except KeyboardInterrupt:
        _logger.warning("interrupted during epoch %d; finished epochs are saved in %s, rerun with --resume to continue",
                        state["epoch"] + 1, out / "last.pt")
        raise

    if not state["history"]:
        raise FeatxError(f"the run in '{out}' has no finished epoch to report; rerun with --resume")
    finished = state["epoch"] >= config.epochs
    last = state["history"][-1]
    train_ok = len(train_idx) - len(set(map(int, state["skipped"])) & set(train_idx.tolist()))
    metrics = {
        "head": f"finetune:{config.freeze}" + ("+init-head" if config.init_head else ""),
        "model": config.model,
        **{k[len("eval_"):]: v for k, v in last.items() if k.startswith("eval_") and k != "eval_loss"},
        "n_train": int(train_ok),
        "n_test": int(last["eval_n"]),
        "fit_seconds": float(state["fit_seconds"]),
        "wall_seconds": float(wall_before + time.perf_counter() - session_start),
        "epochs": config.epochs,
        "epochs_done": state["epoch"],
        "best_epoch": state["best"]["epoch"],
        "best_accuracy": state["best"]["accuracy"],
        "eval_loss": last["eval_loss"],
        "eval_split": eval_name,
        "n_skipped": len(state["skipped"]),
        "weights": info.weights,
        "weights_sha256": info.weights_sha256,
        "freeze": config.freeze,
        "init_head": config.init_head,
        "trainable_params": int(n_trainable),
        "total_params": int(sum(p.numel() for p in model.parameters())),
        "img_size": int(data_config["input_size"][-1]),
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "device": str(device),
        "precision": precision,
        "featx_version": __version__,
    }
    metrics.pop("n", None)
    export_dir = None
    if finished:
        write_text_atomic(out / "metrics.json", json.dumps({**metrics, "history": state["history"],
                                                             "skipped": state["skipped"]}, indent=2, sort_keys=True))
        if config.export != "none":
            export_dir = export_model(out, which=config.export)
    elif (out / "metrics.json").exists():
        (out / "metrics.json").unlink()
    if state["skipped"]:
        _logger.warning("%d unreadable images skipped, e.g. %s", len(state["skipped"]),
                        "; ".join(f"{src.ids[int(i)]}: {r}" for i, r in list(state["skipped"].items())[:3]))
    return FinetuneResult(out=out, metrics=metrics, history=state["history"], epochs_done=state["epoch"], finished=finished,
                          resumed_from=resumed_from, export_dir=export_dir, load_notice=info.load_notice)


def _train_epoch(model, loader, optimizer, scheduler, scaler, criterion, device, precision, config, epoch, skipped) -> dict:
    _train_mode(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # running sums stay on the device; reading them (progress bar, loss check) syncs every _SYNC_EVERY steps only
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}/{config.epochs}", unit="batch", disable=not config.progress, leave=False)
    try:
        for step, (x, y, _, bad) in enumerate(loader, 1):
            skipped.update({str(i): r for i, r in bad})
            if x is None or len(y) < 2:  # all images unreadable, or a single one (BatchNorm cannot train on it)
                scheduler.step()
                bar.update()
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, precision):
                logits = model(x)
                loss = criterion(logits.float(), y)
            scaler.scale(loss).backward()
            if config.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if step % _SYNC_EVERY == 0 or step == len(loader):
                mean_loss = float(loss_sum) / seen
                if not math.isfinite(mean_loss):
                    raise FeatxError(f"the training loss became {mean_loss} in epoch {epoch}; lower --lr, or use --precision bf16 or fp32")
                rate = seen / max(1e-9, time.perf_counter() - t0)
                bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{int(correct) / seen:.3f}", img_s=f"{rate:.1f}", refresh=False)
            bar.update()
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {"train_loss": float(loss_sum) / max(1, seen), "train_accuracy": int(correct) / max(1, seen), "train_images": seen,
            "images_per_s": seen / max(1e-9, seconds)}


@torch.inference_mode()
def _evaluate(model, loader, criterion, device, precision, config, n_classes, skipped) -> dict:
    model.eval()
    y_true, probs, loss_sum = [], [], 0.0
    for x, y, _, bad in loader:
        skipped.update({str(i): r for i, r in bad})
        if x is None:
            continue
        x = x.to(device, non_blocking=True)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, precision):
            logits = model(x).float()
        loss_sum += float(criterion(logits.cpu(), y)) * len(y)
        probs.append(logits.softmax(1).cpu().numpy())
        y_true.append(y.numpy())
    if not y_true:
        raise FeatxError("every evaluation image was unreadable; check the evaluation split")
    y_true, proba = np.concatenate(y_true), np.concatenate(probs)
    metrics = classification_metrics(y_true, proba.argmax(1), proba, n_classes=n_classes)
    return {**metrics, "loss": loss_sum / len(y_true), "n": int(len(y_true))}


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeatxError(f"cannot read '{path}' ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                         "pass --overwrite to start the run again") from None


def export_model(run_dir: str | Path, which: str = "last", out: str | Path | None = None) -> Path:
    """Write ``which`` (last | best) checkpoint of a run as timm's ``config.json`` + ``model.safetensors``.

    Load it with ``timm.create_model('local-dir:<out>', pretrained=True)``, or with
    ``timm.create_model(name, num_classes=K)`` plus ``load_state_dict`` of the safetensors file.
    """
    from timm.models import save_for_hf

    run_dir = Path(run_dir)
    info_path, ckpt_path = run_dir / RUN_FILE, run_dir / f"{which}.pt"
    if not info_path.is_file() or not ckpt_path.is_file():
        raise FeatxError(f"'{run_dir}' holds no finished fine-tuning epoch ({ckpt_path.name} missing); run featx finetune first")
    info = json.loads(info_path.read_text())
    config = info["config"]
    ckpt = _load_checkpoint(ckpt_path)
    kwargs = {"img_size": config["img_size"]} if config.get("img_size") else {}
    try:
        model = timm.create_model(config["model"], num_classes=len(info["class_names"]), **kwargs)
    except TypeError:
        model = timm.create_model(config["model"], num_classes=len(info["class_names"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    out = Path(out) if out else run_dir / "export"
    data_config = {k: info["data_config"][k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
                   if k in info["data_config"]}
    save_for_hf(model, str(out), model_config={"label_names": list(info["class_names"])}, safe_serialization=True,
                data_config=data_config)
    meta = out / "featx.json"
    meta.write_text(json.dumps({"run": str(run_dir), "checkpoint": which, "epoch": ckpt.get("epoch"),
                                "source": info["source"], "data_config": info["data_config"],
                                "featx_version": __version__}, indent=2, default=list))
    return out
