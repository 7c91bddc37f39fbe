"""The extraction engine: a frozen timm backbone over an image source, rows into the store.

Design (see DINOv2's ``extract_features``): inference mode, a fixed grid of batches over the
image list, every image accounted for (a row or a recorded skip), asserted at the end.
Decoding runs in DataLoader workers; resize/crop/normalise run batched on the device
(:mod:`featx.preprocess`). Batches are written to a journal as they finish and the finished
group is committed into the store atomically, so a killed run resumes where it stopped and
reproduces the uninterrupted features exactly (same batch grid, same kernels).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import timm
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import __version__
from .backbones import create_backbone
from .errors import BadImage, FeatxError
from .preprocess import DevicePreprocessor, Geometry, eval_transform
from .sources import ImageSource, resolve_source
from .store import JournalWriter, StoreKey

__all__ = ["ExtractConfig", "ExtractResult", "extract", "iter_embeddings", "resolve_device", "resolve_precision", "autocast_context"]

_logger = logging.getLogger(__name__)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExtractConfig:
    """Options of ``featx extract``; ``None`` means the model's or machine's default."""

    model: str  # timm model name
    pretrained: bool = False  # timm hub weights (needs internet)
    weights: str | None = None  # local checkpoint (.pth/.pt/.safetensors)
    img_size: int | None = None  # override the model's input resolution
    device: str = "auto"  # auto | cpu | cuda[:N]
    batch_size: int = 64
    workers: int | None = None  # DataLoader workers; None: 0 on CPU, up to 16 on CUDA
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (compute)
    channels_last: bool = True
    compile: bool = False  # torch.compile the backbone
    dtype: str = "float32"  # storage dtype: float32 | float16
    preprocess: str = "auto"  # auto | device | host
    key: str | None = None  # group name in the store (default: the model name)
    overwrite: bool = False  # replace an existing group made with other settings
    progress: bool = True


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
    load_notice: str = ""

    @property
    def images_per_s(self) -> float:
        return self.n_processed / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if self.cache_hit:
            return (f"Cache hit: '{self.key}' in {self.out} already holds features for all {self.n_images} images "
                    f"({self.n_rows} rows, {self.n_skipped} skipped); nothing to do.")
        resumed = f" (resumed at image {self.resumed_from})" if self.resumed_from else ""
        text = (f"Extracted {self.n_processed} images{resumed} in {self.seconds:.1f} s "
                f"({self.images_per_s:.1f} images/s on {self.device}, {self.precision}): "
                f"{self.n_rows} feature rows, {self.n_skipped} skipped")
        if self.skipped:
            by_reason: dict[str, list[str]] = {}
            for image_id, reason in self.skipped:
                by_reason.setdefault(reason.split(":")[0].split(" (")[0], []).append(image_id)
            shown = "; ".join(f"{len(ids)} {reason}: {', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}"
                              for reason, ids in by_reason.items())
            text += f" ({shown}; full reasons in the store's skipped list)"
        return text + f". Features are in {self.out} under '{self.key}'."


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FeatxError(f"unknown device '{device}'; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeatxError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in _DTYPES:
        raise FeatxError(f"unknown precision '{precision}'; use auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type == "cpu":
        raise FeatxError("fp16 compute is not supported on CPU; use --precision bf16 or fp32")
    if precision == "bf16" and device.type == "cpu" and not _cpu_has_bf16():
        _logger.warning("this CPU has no native bf16: bf16 autocast is emulated and can be far slower than fp32 "
                        "(over 10x on an AVX2-only CPU); prefer --precision fp32")
    return precision


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True  # unknown: do not warn


def autocast_context(device: torch.device, precision: str):
    """Autocast for bf16/fp16, a no-op context for fp32 (same code on CPU and GPU)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def pooling_name(model: torch.nn.Module) -> str:
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str):
        return pool or "none"
    return str(getattr(pool, "pool_type", type(pool).__name__ if pool is not None else "model-default"))


class _Images(Dataset):
    """Decodes image ``i``; returns (i, tensor, None) or (i, None, reason) for a bad image."""

    def __init__(self, source: ImageSource, prepare):
        self.source = source
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            return i, self.prepare(self.source.load(i)), None
        except BadImage as e:
            return i, None, str(e)


def _collate(batch):
    return batch


def _check_out(out: Path) -> None:
    if out.exists() and (out.is_dir() or not h5py.is_hdf5(out)):
        raise FeatxError(f"--out '{out}' exists and is not an HDF5 feature store; choose another path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FeatxError(f"cannot write --out '{out}': folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise FeatxError(f"cannot write --out '{out}': permission denied")


def _existing_group(out: Path, key: str) -> dict | None:
    if not out.exists():
        return None
    try:
        with h5py.File(out, "r") as f:
            if key not in f:
                return None
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f[key].attrs.items()}
    except OSError as e:
        raise FeatxError(f"cannot read existing store '{out}': {e}") from None


def extract(source: str | ImageSource, config: ExtractConfig, out: str | os.PathLike) -> ExtractResult:
    """Extract embeddings of every image in ``source`` with ``config.model`` into the store ``out``."""
    t_start = time.perf_counter()
    out = Path(out)
    _check_out(out)
    src = source if isinstance(source, ImageSource) else resolve_source(source)
    if len(src) == 0:
        raise FeatxError(f"source '{src.name}' has no images")
    if config.batch_size < 1:
        raise FeatxError("--batch-size must be at least 1")
    if config.dtype not in ("float32", "float16"):
        raise FeatxError(f"unknown storage dtype '{config.dtype}'; use float32 or float16")
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    model, info = create_backbone(config.model, pretrained=config.pretrained, weights=config.weights, img_size=config.img_size)
    data_config, transform = eval_transform(model, config.img_size)
    geometry = Geometry.from_transform(transform)
    mode = config.preprocess
    if mode == "auto":
        mode = "device" if geometry is not None else "host"
    elif mode == "device" and geometry is None:
        raise FeatxError(f"--preprocess device cannot reproduce this model's transform ({transform}); use --preprocess host")
    elif mode not in ("device", "host"):
        raise FeatxError(f"unknown preprocessing '{mode}'; use auto, device or host")
    key = config.key or config.model
    store_key = StoreKey(
        model=config.model,
        weights_sha256=info.weights_sha256,
        data_config=json.dumps(data_config, sort_keys=True, default=list),
        preprocessing=json.dumps({"mode": mode, "transform": repr(transform)}),
        img_size=int(data_config["input_size"][-1]),
        pooling=pooling_name(model),
        precision=precision,
        dtype=config.dtype,
        image_list_sha256=src.fingerprint(),
    )
    existing = _existing_group(out, key)
    if existing is not None:
        diff = store_key.differences(existing)
        if not diff:
            return ExtractResult(out=out, key=key, n_images=len(src), n_rows=int(existing["n_rows"]),
                                 n_skipped=int(existing["n_skipped"]), n_processed=0,
                                 seconds=time.perf_counter() - t_start, cache_hit=True, device=str(device), precision=precision)
        if not config.overwrite:
            raise FeatxError(
                f"'{out}' already holds '{key}' made with different {', '.join(diff)}; "
                "pass --key NAME to store these features beside it, or --overwrite to replace it"
            )

    split_names = src.split_names
    meta = {
        "model_key": key,
        "class_names": json.dumps(src.class_names),
        "source": src.name,
        "n_images": len(src),
        "num_features": info.num_features,
        "weights": info.weights,
        "weights_file_sha256": info.weights_file_sha256 or "",
        "weights_load": info.load_notice,
        "geometry": geometry.to_json() if geometry else "",
        "featx_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": str(torch.__version__),
        "h5py_version": h5py.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    writer = JournalWriter(out, key, store_key, meta, dim=info.num_features, n_images=len(src),
                           batch_size=config.batch_size, split_names=split_names)
    try:
        start = writer.next_image
        batch_size = writer.batch_size
        if writer.resumed:
            if batch_size != config.batch_size:
                _logger.warning("resuming with the interrupted run's batch size %d so features match an uninterrupted run", batch_size)
            _logger.info("resuming '%s' at image %d of %d", key, start, len(src))
        processed = _run(src, model, transform, geometry, mode, device, precision, config, writer, start, batch_size)
        assert writer.next_image == len(src), "every image must be processed"
        n_rows, n_skipped = int(writer.g.attrs["n_rows"]), int(writer.g.attrs["n_skipped"])
        assert n_rows + n_skipped == len(src), "every image must have a row or a recorded skip"
        seconds = time.perf_counter() - t_start
        skipped = writer.skipped()
        writer.commit({"extract_seconds_last_run": seconds, "device": str(device)}, overwrite=config.overwrite)
    except BaseException:
        writer.close()
        raise
    return ExtractResult(out=out, key=key, n_images=len(src), n_rows=n_rows, n_skipped=n_skipped, n_processed=processed,
                         seconds=seconds, resumed_from=start, device=str(device), precision=precision,
                         skipped=skipped, load_notice=info.load_notice)


def _run(src, model, transform, geometry, mode, device, precision, config, writer, start, batch_size) -> int:
    """Embed images ``start:`` in fixed batches and append them to ``writer``; returns images processed."""
    codes = {s: i for i, s in enumerate(writer.split_names)}
    out_dtype = np.dtype(config.dtype)
    bar = tqdm(total=len(src), initial=start, unit="img", desc=f"extract {config.model}", disable=not config.progress, smoothing=0.1)
    processed = 0
    try:
        for feats, ok_idx, bad, next_image in iter_embeddings(
            src, model, transform, device=device, precision=precision, batch_size=batch_size, start=start,
            preprocess=mode, geometry=geometry, workers=config.workers, channels_last=config.channels_last, compile=config.compile,
        ):
            idx = np.asarray(ok_idx, dtype=np.int64)
            writer.write_batch(
                next_image,
                feats.astype(out_dtype, copy=False),
                idx,
                [src.ids[i] for i in ok_idx],
                src.labels[idx],
                np.asarray([codes[src.splits[i]] for i in ok_idx], dtype=np.int8),
                [(i, src.ids[i], reason) for i, reason in bad],
            )
            processed += len(ok_idx) + len(bad)
            bar.update(len(ok_idx) + len(bad))
    finally:
        bar.close()
    return processed


_MALLOC_TUNED = False


def keep_freed_memory() -> None:
    """Stop glibc from handing large freed blocks back to the OS (CPU inference only, once per process).

    A CPU forward allocates and frees its big activation tensors every batch; with glibc's defaults
    each one is an mmap that is unmapped on free and page-faulted back in on the next batch. On the
    2-core VM this project targets that kernel work took more than half of a tf_efficientnet_lite0
    forward (29 -> 70 images/s once disabled). The cost is that the process keeps its peak heap.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError) as e:
        _logger.debug("mallopt unavailable: %s", e)


def default_workers(device: torch.device) -> int:
    return min(16, os.cpu_count() or 1) if device.type == "cuda" else 1


def embedding_workers(device: torch.device) -> int:
    """Decoding workers for inference (extract): up to 16 feeding a GPU, none on CPU.

    On CPU the forward already uses every core, and a forked worker cost the main process more
    kernel time than it saved (CIFAR-10 JPEGs, tf_efficientnet_lite0, 2 cores: 43-47 images/s with
    one worker, 58-61 without). Pass --workers 1 for large photos, whose decoding is worth overlapping.
    """
    return default_workers(device) if device.type == "cuda" else 0


def iter_embeddings(
    src: ImageSource,
    model: torch.nn.Module,
    transform,
    *,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 64,
    start: int = 0,
    preprocess: str = "device",
    geometry: Geometry | None = None,
    workers: int | None = None,
    channels_last: bool = True,
    compile: bool = False,
):
    """Yield ``(features [b, D] float32 numpy, ok indices, [(index, reason)], next_image)`` per batch.

    Batches are the fixed grid ``[start, start + batch_size), ...`` over ``src``; undecodable
    images come back as (index, reason) instead of rows. ``transform`` is timm's eval transform
    (used as is with ``preprocess='host'``); ``geometry`` drives ``preprocess='device'``.
    On CUDA the next batch is computed while the previous one is handed back.
    """
    n = len(src)
    if start >= n:
        return
    pre = None
    if preprocess == "device":
        geometry = geometry or Geometry.from_transform(transform)
        pre = DevicePreprocessor(geometry)
    workers = embedding_workers(device) if workers is None else workers
    loader = DataLoader(
        _Images(src, pre.host_prepare if pre else transform),
        batch_sampler=[list(range(s, min(s + batch_size, n))) for s in range(start, n, batch_size)],
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=4 if workers > 0 else None,
    )
    model = model.eval().to(device)
    if device.type == "cpu":
        keep_freed_memory()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model, dynamic=True)
    dim = int(getattr(model, "num_features", 0) or 0)
    pending = None  # previous batch, handed back while the device computes the next one
    try:
        with torch.inference_mode():
            for batch in loader:
                ok = [(i, t) for i, t, _ in batch if t is not None]
                bad = [(i, r) for i, t, r in batch if t is None]
                feats = None
                if ok:
                    tensors = [t for _, t in ok]
                    x = pre(tensors, device) if pre else torch.stack(tensors).to(device, non_blocking=True)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with autocast_context(device, precision):
                        y = model(x)
                    feats = y.float().to("cpu", non_blocking=True)
                    dim = feats.shape[1]
                if pending is not None:
                    yield pending
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()
                feats = feats.numpy() if feats is not None else np.empty((0, dim), np.float32)
                pending = (feats, [i for i, _ in ok], bad, batch[-1][0] + 1)
            if pending is not None:
                yield pending
    except torch.OutOfMemoryError:
        raise FeatxError(f"out of memory on {device} at batch size {batch_size}; rerun with a smaller --batch-size") from None
