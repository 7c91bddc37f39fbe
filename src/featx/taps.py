"""Which outputs of a timm backbone make the embedding: the pooled pre-logits ('last'), stages or blocks ("taps"), all
from one forward pass, and :class:`EmbeddingNet`, the embedding (taps and flip averaging included) as one module that
the exported-graph runtimes and ``featx export`` run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import FeatxError

__all__ = ["Tap", "parse_taps", "tapped", "pooling_name", "EmbeddingNet"]


def pooling_name(model: torch.nn.Module) -> str:
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str):
        return pool or "none"
    return str(getattr(pool, "pool_type", type(pool).__name__ if pool is not None else "model-default"))


@dataclass(frozen=True)
class Tap:
    """One pooled output in the embedding: 'last', a stage ('-2': timm's feature_info, from the end) or a block ('b-2':
    the output of a block, counted from the end, for models with ``forward_intermediates(extra_blocks=True)``)."""

    name: str
    index: int | None  # absolute stage or block index; None for 'last'
    start: int
    stop: int

    @property
    def dim(self) -> int:
        return self.stop - self.start

    @property
    def block(self) -> bool:
        return self.name.startswith("b")


def parse_taps(layers: str, model: torch.nn.Module, model_name: str) -> list[Tap]:
    """``'last,-1,-2'`` or ``'last,b-1,b-2'`` -> taps with their column ranges, checked against the model."""
    names = [t.strip() for t in str(layers).split(",") if t.strip()]
    if not names:
        raise FeatxError("--layers is empty; use last, or last plus stages counted from the end, e.g. last,-1,-2")
    if len(set(names)) < len(names):
        raise FeatxError(f"--layers names '{next(n for n in names if names.count(n) > 1)}' twice")
    index = {n: _tap_index(n, model, model_name) for n in names}
    if len({n.startswith("b") for n in names if n != "last"}) > 1:
        raise FeatxError("--layers mixes stage taps (-1) and block taps (b-1); use one kind")
    dims = _tap_dims(model, index)
    taps, start = [], 0
    for name in names:
        taps.append(Tap(name, index[name], start, start + dims[name]))
        start += dims[name]
    return taps


def _tap_index(name: str, model: torch.nn.Module, model_name: str) -> int | None:
    """Absolute stage (or block) index of a tap counted from the end; None for 'last'."""
    import inspect

    if name == "last":
        return None
    block = name.startswith("b")
    try:
        k = int(name[1:] if block else name)
    except ValueError:
        raise FeatxError(f"unknown --layers entry '{name}'; use last, a stage such as -1 or a block such as b-1") from None
    if not hasattr(model, "forward_intermediates"):
        raise FeatxError(f"'{model_name}' exposes no stages (timm forward_intermediates); use --layers last")
    if block and "extra_blocks" not in inspect.signature(model.forward_intermediates).parameters:
        raise FeatxError(f"'{model_name}' has no block taps (forward_intermediates(extra_blocks=...)); use stage taps such as -1")
    count = len(model.blocks) + 1 if block else len(getattr(model, "feature_info", []) or [])
    what = "blocks (stem included)" if block else "stages"
    if not -count <= k <= -1:
        prefix = "b" if block else ""
        raise FeatxError(f"--layers {name}: '{model_name}' has {count} {what}; use {prefix}-1 .. {prefix}-{count} (or last)")
    return count + k


@torch.inference_mode()
def _tap_dims(model: torch.nn.Module, index: dict) -> dict:
    """Width of every tap, from one forward of a blank image at the model's input size."""
    from timm.data import resolve_model_data_config

    dims = {n: int(getattr(model, "head_hidden_size", None) or model.num_features) for n, i in index.items() if i is None}  # after a pooled head conv (MobileNetV3)
    taps = [n for n, i in index.items() if i is not None]
    if taps:
        size = resolve_model_data_config(model)["input_size"]
        was_training = model.training
        x = torch.zeros(1, *size)
        pooled = _pooled(model.eval(), x, [index[n] for n in taps], any(n.startswith("b") for n in taps), want_last=False)[1]
        model.train(was_training)
        dims.update({n: int(pooled[index[n]].shape[1]) for n in taps})
    return dims


def _pooled(model: torch.nn.Module, x: torch.Tensor, indices: list[int], blocks: bool, want_last: bool):
    """(model output before the head or None, {index: globally average-pooled output}) from one forward pass."""
    kwargs = {"extra_blocks": True} if blocks else {}
    wanted = sorted(set(indices))
    out = model.forward_intermediates(x, indices=wanted, intermediates_only=not want_last, **kwargs)
    final, inter = out if want_last else (None, out)
    return final, {i: f.float().mean((2, 3)) for i, f in zip(wanted, inter)}


def tapped(model: torch.nn.Module, x: torch.Tensor, taps: list[Tap]) -> torch.Tensor:
    """Every tap from one forward pass: stages or blocks pooled, 'last' as the model's own pooled pre-logits."""
    want_last = any(t.index is None for t in taps)
    indices = [t.index for t in taps if t.index is not None]
    final, pooled = _pooled(model, x, indices, any(t.block for t in taps), want_last) if indices else (None, {})
    if want_last and final is None:
        return model(x)
    return torch.cat([model.forward_head(final, pre_logits=True).float() if t.index is None else pooled[t.index] for t in taps], 1)


class EmbeddingNet(torch.nn.Module):
    """The embedding as one module: normalised images [n, 3, H, W] -> features [n, D] (float32), taps and flip averaging
    included. What the ONNX runtime and ``featx export`` run; the torch runtime computes the same in
    :meth:`ImageEmbedder.embed_prepared`."""

    def __init__(self, model: torch.nn.Module, taps: list[Tap], tta: str | None):
        super().__init__()
        self.model = model
        self.taps = taps
        self.flip = tta == "flip"

    def _one_view(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) if [t.name for t in self.taps] == ["last"] else tapped(self.model, x, self.taps)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip:
            return (self._one_view(x) + self._one_view(x.flip(3))) / 2
        return self._one_view(x)
