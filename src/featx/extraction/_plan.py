"""Deciding, per backbone, what an extraction has to do: nothing (a cache hit), every image, or only the new ones."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..configs import ExtractConfig
from ..device import resolve_device
from ..embedder import ImageEmbedder
from ..errors import FeatxError
from ..files import safe_name
from ..provenance import provenance
from ..runtimes import graph_usable, runtime_available
from ..sources import ImageSource
from ..store import FeatureStore, StoreKey, forget_committed_journals, group_attrs
from ._cached import key_request

__all__ = ["Job", "plan_job", "group_meta", "onnx_cache_dir"]

_logger = logging.getLogger(__name__)
_IMAGE_FIELDS = {"image_list_sha256", "image_stamps_sha256"}


@dataclass
class Job:
    """One backbone's share of an extraction."""

    config: ExtractConfig
    key: str
    embedder: ImageEmbedder
    store_key: StoreKey
    todo: np.ndarray | None  # positions in the image list to embed; None: a cache hit
    existing: dict | None = None  # attributes of the group already in the store
    extend: bool = False  # add the rows of ``todo`` to the group's present rows
    added_to: int = 0  # images the group holds already (when extending)


def plan_job(config: ExtractConfig, src: ImageSource, out: Path, device: str, world: int, *, speak: bool = True) -> Job:
    """Build ``config``'s backbone and compare what it would write with what ``out`` holds under its key.

    ``speak``: log what was found (rank 0 of a torchrun job speaks for all).
    """
    log = _logger.info if speak else _logger.debug
    warn = _logger.warning if speak else _logger.debug
    key = config.key or config.model
    existing = group_attrs(out, key)
    runtime, recorded = config.runtime, (existing or {}).get("runtime", "torch")
    if runtime == "auto" and existing is not None and not config.overwrite and runtime_available(recorded) and (
            recorded == "torch" or graph_usable(resolve_device(device), config.precision, config.compile)):
        runtime = recorded  # auto keeps a group's own runtime: a rerun stays a cache hit, added images match its rows
    embedder = ImageEmbedder(config.model, pretrained=config.pretrained, weights=config.weights, img_size=config.img_size,
                             device=device, precision=config.precision, batch_size=config.batch_size, workers=config.workers,
                             preprocess=config.preprocess, channels_last=config.channels_last, compile=config.compile,
                             layers=config.layers, tta=config.tta, runtime=runtime, onnx_cache=str(onnx_cache_dir(out, key))).fit()
    store_key = StoreKey(**embedder.identity(), dtype=config.dtype, image_list_sha256=src.fingerprint(),
                         image_stamps_sha256=src.stamps_fingerprint())
    if speak:
        _warn_about_other_journals(out, key, world)
    job = Job(config, key, embedder, store_key, np.arange(len(src)), existing)
    if existing is None:
        return job
    diff = store_key.differences(existing)
    if not diff:
        if "image_stamps_sha256" not in existing:
            warn("'%s' in '%s' was written without file sizes and times (featx 0.1), so a replaced image cannot be "
                            "noticed; pass --overwrite to re-extract it if images changed", key, out)
        forget_committed_journals(out, key)
        job.todo = None
        return job
    if config.overwrite:
        return job
    detail = ""
    if set(diff) <= _IMAGE_FIELDS:
        new, detail = _grown_by(out, key, src)
        if new is not None:
            job.todo, job.extend, job.added_to = new, True, len(src) - len(new)
            log("'%s' in '%s' holds %d of these %d images; embedding the %d new ones", key, out, job.added_to, len(src), len(new))
            return job
    raise FeatxError(f"'{out}' already holds '{key}' made with different {', '.join(diff)}{detail}; "
                     "pass --key NAME to store these features beside it, or --overwrite to replace it")


def onnx_cache_dir(out: Path, key: str | None = None) -> Path:
    """Where the ONNX graphs of a store's backbones are cached: ``FEATURES.h5.onnx/<key>/`` beside it, one graph per key
    (named by a hash of what shapes it, as the store's key names what made the features)."""
    folder = out.with_name(out.name + ".onnx")
    return folder / safe_name(key) if key is not None else folder


def _grown_by(out: Path, key: str, src: ImageSource) -> tuple[np.ndarray | None, str]:
    """Positions of the images added to the source since ``key`` was extracted, if nothing else changed; else why not."""
    with FeatureStore(out) as store:
        old = store.image_list(key)
    if old is None:
        return None, " (written without file stamps, so added images cannot be told from changed ones)"
    if len(set(src.ids)) != len(src.ids) or len(set(old["ids"])) != len(old["ids"]):
        return None, " (an image is listed twice, so added images cannot be told apart)"
    pos = {image_id: i for i, image_id in enumerate(src.ids)}
    stamps = src.file_stamps()
    removed, changed, seen = [], [], np.zeros(len(src), bool)
    for image_id, cls, split, stamp in zip(old["ids"], old["classes"], old["splits"], old["stamps"].tolist()):
        i = pos.get(image_id)
        if i is None:
            removed.append(image_id)
            continue
        seen[i] = True
        now_cls = src.class_names[src.labels[i]] if src.labels[i] >= 0 else ""
        if stamps[i].tolist() != stamp or (cls is not None and cls != now_cls) or (split is not None and split != src.splits[i]):
            changed.append(image_id)
    if removed or changed:
        parts = [f"{len(v)} {what}: {', '.join(v[:3])}{', ...' if len(v) > 3 else ''}"
                 for what, v in (("changed since", changed), ("removed", removed)) if v]
        return None, f" ({'; '.join(parts)})"
    new = np.flatnonzero(~seen)
    return (new, "") if len(new) else (None, "")


def _warn_about_other_journals(out: Path, key: str, world: int) -> None:
    """Journals of an interrupted run with another number of processes are not resumed by this one: say so."""
    prefix = f"{out.name}.{safe_name(key)}."
    mine = {f"{prefix}partial"} if world == 1 else {f"{prefix}rank{r}-of-{world}.partial" for r in range(world)}
    other = sorted(p.name for p in out.parent.glob(f"{prefix}*partial") if p.name not in mine)
    if other:
        _logger.warning("interrupted journals of a run with another number of processes are waiting (%s); this run does not "
                        "use them: rerun with that number of processes to finish them, or delete them", ", ".join(other))


def group_meta(job: Job, src: ImageSource) -> dict:
    """Attributes of a new group besides its :class:`StoreKey`: what it is and what produced it (the request its key
    was computed from, read by the cache-hit check that runs before torch is imported)."""
    embedder = job.embedder
    info, geometry = embedder.info_, embedder.geometry_
    return {
        "model_key": job.key,
        "key_request": key_request(job.config, precision=embedder.precision_, weights_file_sha256=info.weights_file_sha256),
        "class_names": json.dumps(src.class_names),
        "source": src.name,
        "n_images": len(src),
        "num_features": embedder.num_features_,
        "weights": info.weights,
        "weights_file_sha256": info.weights_file_sha256 or "",
        "weights_load": info.load_notice,
        "geometry": geometry.to_json() if geometry else "",
        "taps": embedder.taps_json(),
        "num_params": sum(p.numel() for p in embedder.model_.parameters()),
        **provenance(),
    }
