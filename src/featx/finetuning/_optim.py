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
