"""``featx extract``: a frozen backbone over an image source, rows into the feature store.

Design (see DINOv2's ``extract_features``): inference mode, a fixed grid of batches over the
image list, every image accounted for (a row or a recorded skip), asserted at the end.
Batches are written to a journal as they finish and the finished group is committed into the
store atomically, so a killed run resumes where it stopped and reproduces the uninterrupted
features exactly (same batch grid, same kernels).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .configs import ExtractConfig
from .embedder import ImageEmbedder
from .errors import FeatxError
from .provenance import provenance
from .sources import ImageSource, resolve_source
from .store import JournalWriter, StoreKey, check_store_path, group_attrs

__all__ = ["ExtractConfig", "ExtractResult", "extract"]

_logger = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    """What an extraction did."""

    out: Path
    key: str
    n_images: int  # images in the source
    n_rows: int  # feature rows in the store
    n_skipped: int  # undecodable images (listed in the store with reasons)
    n_processed: int  # images processed by this run (0 on a cache hit)
    seconds: float
    cache_hit: bool = False
    resumed_from: int = 0  # first image this run processed, when it resumed a journal
    device: str = "cpu"
    precision: str = "fp32"
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.n_processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "out": str(self.out), "images_per_s": self.images_per_s}

    def summary(self) -> str:
        if self.cache_hit:
            return (f"Cache hit: '{self.key}' in {self.out} already holds features for all {self.n_images} images "
                    f"({self.n_rows} rows, {self.n_skipped} skipped); nothing to do.")
        resumed = f" (resumed at image {self.resumed_from})" if self.resumed_from else ""
        text = (f"Extracted {self.n_processed} images{resumed} in {self.seconds:.1f} s "
                f"({self.images_per_s:.1f} images/s on {self.device}, {self.precision}): "
                f"{self.n_rows} feature rows, {self.n_skipped} skipped")
        if self.skipped:
            text += f" ({skip_digest(self.skipped)}; full reasons in the store's skipped list)"
        return text + f". Features are in {self.out} under '{self.key}'."


def skip_digest(skipped: list[tuple[str, str]], shown: int = 3) -> str:
    """'2 not a readable image: a.png, b.png; 1 empty file: c.png': skipped images grouped by reason."""
    by_reason: dict[str, list[str]] = {}
    for image_id, reason in skipped:
        by_reason.setdefault(reason.split(":")[0].split(" (")[0], []).append(image_id)
    return "; ".join(f"{len(ids)} {reason}: {', '.join(ids[:shown])}{', ...' if len(ids) > shown else ''}"
                     for reason, ids in by_reason.items())


def extract(source: str | ImageSource, config: ExtractConfig, out: str | os.PathLike) -> ExtractResult:
    """Extract embeddings of every image in ``source`` with ``config.model`` into the store ``out``."""
    t_start = time.perf_counter()
    out = Path(out)
    check_store_path(out)
    src = source if isinstance(source, ImageSource) else resolve_source(source)
    if len(src) == 0:
        raise FeatxError(f"source '{src.name}' has no images")
    if config.dtype not in ("float32", "float16"):
        raise FeatxError(f"unknown storage dtype '{config.dtype}'; use float32 or float16")
    embedder = ImageEmbedder(config.model, pretrained=config.pretrained, weights=config.weights, img_size=config.img_size,
                             device=config.device, precision=config.precision, batch_size=config.batch_size, workers=config.workers,
                             preprocess=config.preprocess, channels_last=config.channels_last, compile=config.compile,
                             layers=config.layers, tta=config.tta).fit()
    key = config.key or config.model
    store_key = StoreKey(**embedder.identity(), dtype=config.dtype, image_list_sha256=src.fingerprint())
    existing = group_attrs(out, key)
    if existing is not None:
        diff = store_key.differences(existing)
        if not diff:
            return ExtractResult(out=out, key=key, n_images=len(src), n_rows=int(existing["n_rows"]),
                                 n_skipped=int(existing["n_skipped"]), n_processed=0, seconds=time.perf_counter() - t_start,
                                 cache_hit=True, device=str(embedder.device_), precision=embedder.precision_)
        if not config.overwrite:
            raise FeatxError(f"'{out}' already holds '{key}' made with different {', '.join(diff)}; "
                             "pass --key NAME to store these features beside it, or --overwrite to replace it")
    writer = JournalWriter(out, key, store_key, _group_meta(key, src, embedder), dim=embedder.num_features_,
                           n_images=len(src), batch_size=config.batch_size, split_names=src.split_names)
    try:
        start = _resume_point(writer, config, key, len(src))
        processed = _embed_into(writer, src, embedder, start, progress=config.progress, dtype=config.dtype)
        n_rows, n_skipped = int(writer.g.attrs["n_rows"]), int(writer.g.attrs["n_skipped"])
        assert writer.next_image == len(src) and n_rows + n_skipped == len(src), "every image has a row or a recorded skip"
        seconds = time.perf_counter() - t_start
        skipped = writer.skipped()
        _check_skips(src, skipped, writer)
        writer.commit({"extract_seconds_last_run": seconds, "device": str(embedder.device_),
                       "images_per_s": processed / seconds if seconds > 0 else 0.0}, overwrite=config.overwrite)
    except BaseException:
        writer.close()
        raise
    return ExtractResult(out=out, key=key, n_images=len(src), n_rows=n_rows, n_skipped=n_skipped, n_processed=processed,
                         seconds=seconds, resumed_from=start, device=str(embedder.device_), precision=embedder.precision_,
                         skipped=skipped)


# Share of unreadable images above which extraction warns loudly (a few broken files are normal).
LOUD_SKIP_SHARE = 0.05


def _check_skips(src: ImageSource, skipped: list[tuple[str, str]], writer: JournalWriter) -> None:
    """Fail when no image could be read (nothing is committed); warn loudly when more than a few percent were skipped."""
    if len(skipped) == len(src):
        writer.discard()
        hint = ""
        if all(reason == "file not found" for _, reason in skipped) and str(src.name).lower().endswith(".csv"):
            hint = "; paths in a CSV manifest are relative to the CSV's folder"
        raise FeatxError(f"none of the {len(src)} images of '{src.name}' could be read ({skip_digest(skipped)}){hint}; "
                         "nothing was written")
    if len(skipped) > LOUD_SKIP_SHARE * len(src):
        _logger.warning("%d of %d images (%.0f%%) could not be read and are skipped: %s", len(skipped), len(src),
                        100 * len(skipped) / len(src), skip_digest(skipped))


def _group_meta(key: str, src: ImageSource, embedder: ImageEmbedder) -> dict:
    """Attributes of a new group besides its :class:`StoreKey`: what it is and what produced it."""
    info, geometry = embedder.info_, embedder.geometry_
    return {
        "model_key": key,
        "class_names": json.dumps(src.class_names),
        "source": src.name,
        "n_images": len(src),
        "num_features": embedder.num_features_,
        "num_params": sum(p.numel() for p in embedder.model_.parameters()),
        "weights": info.weights,
        "weights_file_sha256": info.weights_file_sha256 or "",
        "weights_load": info.load_notice,
        "geometry": geometry.to_json() if geometry else "",
        "taps": embedder.taps_json(),
        **provenance(),
    }


def _resume_point(writer: JournalWriter, config: ExtractConfig, key: str, n_images: int) -> int:
    if writer.resumed:
        if writer.batch_size != config.batch_size:
            _logger.warning("resuming with the interrupted run's batch size %d so features match an uninterrupted run", writer.batch_size)
        _logger.info("resuming '%s' at image %d of %d", key, writer.next_image, n_images)
    return writer.next_image


def _embed_into(writer: JournalWriter, src: ImageSource, embedder: ImageEmbedder, start: int, *, progress: bool, dtype: str) -> int:
    """Embed images ``start:`` in the journal's batch grid and append them to it; returns images processed."""
    codes = {s: i for i, s in enumerate(writer.split_names)}
    out_dtype = np.dtype(dtype)
    processed = 0
    with tqdm(total=len(src), initial=start, unit="img", desc=f"extract {embedder.model}", disable=not progress, smoothing=0.1) as bar:
        for batch in embedder.iter_batches(src, start=start, batch_size=writer.batch_size):
            idx = np.asarray(batch.index, dtype=np.int64)
            writer.write_batch(
                batch.next_image,
                batch.features.astype(out_dtype, copy=False),
                idx,
                [src.ids[i] for i in batch.index],
                src.labels[idx],
                np.asarray([codes[src.splits[i]] for i in batch.index], dtype=np.int8),
                [(i, src.ids[i], reason) for i, reason in batch.bad],
            )
            processed += len(batch.index) + len(batch.bad)
            bar.update(len(batch.index) + len(batch.bad))
    return processed
