"""Weight-space interpolation between a run's frozen start and a fine-tuned model (WiSE-FT, Wortsman et al. 2022).

``start + alpha * (fine-tuned - start)`` for every floating-point tensor of the state (parameters and BatchNorm
statistics alike; integer counters keep the fine-tuned values). Between a linear-probe start and its fine-tuned
descendant the interpolations often beat both ends, and they move back toward features that were already right
when fine-tuning drifted away from them.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["snapshot", "interpolate_state", "interpolated"]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's state."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def interpolate_state(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``start + alpha * (end - start)`` for floating-point tensors, ``end``'s value for the others (on ``end``'s devices)."""
    return {k: torch.lerp(start[k].to(v.device, v.dtype), v, alpha) if v.is_floating_point() else v for k, v in end.items()}


@contextlib.contextmanager
def interpolated(model: torch.nn.Module, start: dict[str, torch.Tensor], alpha: float):
    """Inside the block the model holds the interpolation ``alpha`` of the way from ``start`` to its own state; after it,
    its own state again, bit for bit (so a run that scores interpolations trains on exactly as one that does not)."""
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.load_state_dict(interpolate_state(start, own, alpha))
    try:
        yield model
    finally:
        with torch.no_grad():
            model.load_state_dict(own)
