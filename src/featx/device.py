"""Where and how tensors are computed: device, precision, autocast, decoding workers, CPU allocator tuning."""

from __future__ import annotations

import logging
import os
import platform
from contextlib import nullcontext

import torch

from .errors import FeatxError

__all__ = ["resolve_device", "resolve_precision", "autocast_context", "inference_workers", "training_workers",
           "keep_freed_memory", "COMPUTE_DTYPES"]

_logger = logging.getLogger(__name__)
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]`` as a :class:`torch.device`."""
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
    """``auto``: bf16 on GPUs that support it (else fp16), fp32 on CPU; explicit choices are checked."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in COMPUTE_DTYPES:
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
    return torch.autocast(device_type=device.type, dtype=COMPUTE_DTYPES[precision])


def training_workers(device: torch.device) -> int:
    """Decoding workers while training: up to 16 feeding a GPU, one beside a CPU model."""
    return min(16, os.cpu_count() or 1) if device.type == "cuda" else 1


def inference_workers(device: torch.device) -> int:
    """Decoding workers for inference (extract, predict): up to 16 feeding a GPU, none on CPU.

    On CPU the forward already uses every core, and a forked worker cost the main process more
    kernel time than it saved (CIFAR-10 JPEGs, tf_efficientnet_lite0, 2 cores: 43-47 images/s with
    one worker, 58-61 without). Pass --workers 1 for large photos, whose decoding is worth overlapping.
    """
    return training_workers(device) if device.type == "cuda" else 0


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
