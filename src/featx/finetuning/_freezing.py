"""Which parameters train: timm's coarse stages, the head, and the modules kept in eval mode.

Stages (``freeze='stages:N'``) are timm's own coarse parameter groups
(``model.group_matcher(coarse=True)``, the grouping timm uses for layer-wise lr decay): the stem
first, then one group per stage (ResNet ``layer1..4``, EfficientNet ``blocks.0..6``, one group
per ViT block). Final convs/norms that timm attaches to the last block (EfficientNet
``conv_head``/``bn2``, ViT ``norm``) belong to the last stage, because ``featx extract``'s
frozen features are taken after them. The head is the classifier plus anything timm leaves
after the last block (ViT ``fc_norm``, ConvNeXt ``head.norm``); it is always trained.
``stages:N`` trains the last N groups; frozen modules also stay in eval mode (BatchNorm
statistics and drop-path untouched), so ``freeze='all'`` is exactly a linear probe with
augmentation. ``auto`` (the default) trains the last :data:`AUTO_STAGES` stages on sets of at most
:data:`SMALL_SET` training images and everything on larger ones (:func:`resolve_freeze`).
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..configs import parse_freeze
from ..errors import FeatxError

__all__ = ["parse_freeze", "resolve_freeze", "model_stages", "apply_freeze", "train_mode", "classifier_keys", "AUTO_STAGES",
           "SMALL_SET"]

# The recipe search (benchmarks/RESULTS.md, finetune_search): on its regimes of at most 1,000 training images, training the
# last two stages kept the probe's result everywhere the whole network did and beat it once, at less cost per epoch.
AUTO_STAGES = 2
SMALL_SET = 1000


def _classifier_names(model: torch.nn.Module) -> list[str]:
    classifier = model.get_classifier()
    if isinstance(classifier, str):
        classifier = model.get_submodule(classifier)
    for prefix, module in model.named_modules():
        if module is classifier:
            return [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]
    return []


def classifier_keys(model: torch.nn.Module) -> tuple[str, str]:
    """The state-dict keys of the classifier's weight and bias."""
    names = _classifier_names(model)
    weight = next(n for n in names if n.endswith("weight"))
    return weight, weight[: -len("weight")] + "bias"


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


def resolve_freeze(spec: str, n_images: int, model: torch.nn.Module) -> str:
    """``spec``, with ``auto`` made concrete: ``stages:2`` for at most :data:`SMALL_SET` training images (``none`` when the model
    has no stage grouping or too few stages), ``none`` above."""
    if parse_freeze(spec)[0] != "auto":
        return spec
    if n_images > SMALL_SET or not hasattr(model, "group_matcher") or len(model_stages(model)[0]) <= AUTO_STAGES:
        return "none"
    return f"stages:{AUTO_STAGES}"


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


def train_mode(model: torch.nn.Module, *, frozen_bn_stats: bool = False) -> None:
    """Train mode, except modules whose parameters are all frozen (BatchNorm stats, drop-path stay put) and, with
    ``frozen_bn_stats``, every BatchNorm layer: normalised by its pretrained running statistics, its scale and shift still trained.

    Small batches of a domain far from ImageNet move re-estimated statistics, and with them every feature a linear probe
    was fitted on (featx 0.1's recipe search, commit c9632e3: CIFAR-10 subset at 96 px, Lite0, probe start 70.2%; 76.4% after
    two epochs with statistics frozen, while with them re-estimated no epoch beat the probe on validation).
    """
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if (params and not any(p.requires_grad for p in params)) or (frozen_bn_stats and isinstance(module, _BatchNorm)):
            module.eval()
