"""What the machine offers that is known without importing torch: whether a device request is certainly the CPU."""

from __future__ import annotations

import os
import platform

__all__ = ["certainly_cpu"]

# Device files through which torch could reach a GPU (NVIDIA, AMD ROCm, WSL); without any, device 'auto' is the CPU.
_GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def certainly_cpu(device: str) -> bool:
    """True when ``device`` resolves to the CPU for sure: 'cpu', or 'auto' on a machine without GPU device files."""
    if device == "cpu":
        return True
    return device == "auto" and platform.system() in ("Linux", "Darwin") and not any(os.path.exists(f) for f in _GPU_DEVICE_FILES)
