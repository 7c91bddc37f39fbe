"""AdamW with timm's layer-wise learning-rate decay, and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch

from ..configs import FinetuneConfig

__all__ = ["WarmupCosine", "build_optimizer"]


class WarmupCosine:
    """lr multiplier: linear warm-up from 0 over ``warmup`` steps, then cosine decay to ``min_ratio``."""

    def __init__(self, total: int, warmup: int, min_ratio: float = 0.0):
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _param_groups(model: torch.nn.Module, config: FinetuneConfig) -> list[dict]:
    """timm's parameter groups (weight decay off for biases and norms; layer-wise lr scales when asked), the classifier's
    parameters in groups of their own at ``lr_scale * head_lr_scale``."""
    from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay

    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    layer_decay = config.layer_decay if config.layer_decay not in (None, 1.0) else None
    if layer_decay is not None:
        groups = param_groups_layer_decay(model, config.weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, config.weight_decay, no_weight_decay_list=no_decay)
    classifier = model.get_classifier()
    classifier = model.get_submodule(classifier) if isinstance(classifier, str) else classifier
    head = {id(p) for p in classifier.parameters()}
    split = []
    for group in groups:
        scale = group.get("lr_scale", 1.0)
        body = [p for p in group["params"] if id(p) not in head]
        top = [p for p in group["params"] if id(p) in head]
        split += [{**group, "params": body, "lr_scale": scale}] if body else []
        split += [{**group, "params": top, "lr_scale": scale * config.head_lr_scale}] if top else []
    return split


def build_optimizer(model: torch.nn.Module, config: FinetuneConfig, total_steps: int):
    """AdamW over the trainable parameters and its warm-up + cosine schedule.

    Group ``g`` gets ``lr * lr_scale_g``: with ``layer_decay``, timm's ``layer_decay ** (depth from the head)`` over its fine
    parameter groups (the head trains at ``lr``, the stem slowest); the classifier's groups also get ``head_lr_scale``.
    """
    optimizer = torch.optim.AdamW(_param_groups(model, config), lr=config.lr, weight_decay=config.weight_decay)
    for group in optimizer.param_groups:
        group["lr"] = config.lr * group["lr_scale"]
    schedule = WarmupCosine(total_steps, int(round(config.warmup * total_steps)), config.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
