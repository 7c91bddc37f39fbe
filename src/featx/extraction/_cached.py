"""What ``featx extract`` decides before any backbone is built: the user's mistakes, and cache hits.

Nothing here imports torch, timm or scikit-learn, so a mistake or a cache hit is answered in a second.

A cache hit is decided as the full plan (:mod:`._plan`) decides it, from the store's key, the image list and the
file stamps. The key's backbone fields (weights hash, data config, preprocessing, pooling, taps) are computed from
a built backbone; what they are computed *from* is recorded beside them, in the group's ``key_request`` attribute:
the options in :data:`KEY_OPTIONS`, the weights file's hash, the compute precision and the code that computed them
(featx's source, timm, torch, torchvision). When this run's request equals the recorded one and its image list and
file stamps hash to the recorded ones, the full plan would compute the same key: a cache hit. Whatever cannot be
decided without torch (a GPU that might be used, hub weights, a torchrun job, journals of an interrupted run, a
store written before requests were recorded) is left to the full plan.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..configs import ExtractConfig
from ..errors import FeatxError
from ..files import NAMED_WEIGHTS, check_checkpoint_file, file_sha256, safe_name
from ..machine import certainly_cpu
from ..provenance import code_versions
from ..sources import ImageSource, resolve_source
from ..store import check_store_path, group_attrs, group_feature_dim
from ._result import ExtractResult

__all__ = ["KEY_OPTIONS", "key_request", "check_extraction", "cache_hits"]

# The options of ExtractConfig that, with the weights and the code, determine a group's StoreKey besides its images.
# An option that changes the features goes here (and into StoreKey): requests recorded without it then differ.
KEY_OPTIONS = ("model", "pretrained", "img_size", "preprocess", "layers", "tta", "dtype")


def key_request(config: ExtractConfig, *, precision: str, weights_file_sha256: str | None) -> str:
    """The recorded request of a group: JSON of what its key was computed from (see the module's docstring)."""
    request = {name: getattr(config, name) for name in KEY_OPTIONS}
    request.update(weights_file_sha256=weights_file_sha256 or "", precision=precision, code=code_versions())
    return json.dumps(request, sort_keys=True)


def check_configs(configs: list[ExtractConfig]) -> None:
    """Options that cannot go together, refused before any work."""
    if not configs:
        raise FeatxError("no --model given")
    for c in configs:
        c.validate()  # weights named or given, a key HDF5 can hold
        if c.dtype not in ("float32", "float16"):
            raise FeatxError(f"unknown storage dtype '{c.dtype}'; use float32 or float16")
    keys = [c.key or c.model for c in configs]
    if len(set(keys)) != len(keys):
        raise FeatxError("two models would be stored under the same key; give each its own --key")
    for name in ("device", "batch_size", "workers", "split", "progress"):
        if len({str(getattr(c, name)) for c in configs}) > 1:
            raise FeatxError(f"models extracted in one pass share --{name.replace('_', '-')}; run them separately to differ")


def check_extraction(source: str | os.PathLike | ImageSource, configs: list[ExtractConfig], out: Path) -> ImageSource:
    """Every check of an extraction that needs no backbone (options, --out, checkpoint files, the source and its
    images); returns the resolved source."""
    check_store_path(out)
    check_configs(configs)
    for c in configs:
        if c.weights is not None and c.weights not in NAMED_WEIGHTS:
            check_checkpoint_file(c.weights)
    src = source if isinstance(source, ImageSource) else resolve_source(source, split=configs[0].split)
    if len(src) == 0:
        raise FeatxError(f"source '{src.name}' has no images")
    return src


def _cache_hit(src: ImageSource, config: ExtractConfig, out: Path, t_start: float) -> ExtractResult | None:
    """The result of a cache hit of ``config`` in ``out``, or None when it is not one for sure."""
    if config.pretrained or config.weights in NAMED_WEIGHTS or config.precision not in ("auto", "fp32") or not certainly_cpu(config.device):
        return None
    key = config.key or config.model
    if any(out.parent.glob(f"{out.name}.{safe_name(key)}.*partial")):  # an interrupted run's journals: the full plan decides
        return None
    attrs = group_attrs(out, key)
    if attrs is None or "key_request" not in attrs or "image_stamps_sha256" not in attrs:
        return None
    if config.runtime not in ("auto", attrs.get("runtime", "torch")):  # auto keeps a group's recorded runtime, as the full plan does
        return None
    request = key_request(config, precision="fp32", weights_file_sha256=file_sha256(config.weights) if config.weights else None)
    same = (attrs["key_request"] == request and attrs.get("image_list_sha256") == src.fingerprint()
            and attrs["image_stamps_sha256"] == src.stamps_fingerprint())
    if not same:
        return None
    return ExtractResult(out=out, key=key, n_images=len(src), n_rows=int(attrs.get("n_rows", 0)), n_skipped=int(attrs.get("n_skipped", 0)),
                         n_processed=0, seconds=time.perf_counter() - t_start, cache_hit=True, device="cpu", precision="fp32",
                         dim=group_feature_dim(out, key))


def cache_hits(src: ImageSource, configs: list[ExtractConfig], out: Path, t_start: float | None = None) -> list[ExtractResult] | None:
    """One cache-hit result per config when every group is a cache hit for sure (decided without torch), else None."""
    from ..distributed import launched_ranks

    t_start = time.perf_counter() if t_start is None else t_start
    if launched_ranks() is not None:  # every rank of a torchrun job must take the same path: the full one
        return None
    results = []
    for config in configs:
        result = _cache_hit(src, config, Path(out), t_start)
        if result is None:
            return None
        results.append(result)
    return results
