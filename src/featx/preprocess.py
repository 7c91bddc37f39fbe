"""Preprocessing taken from timm, in two equivalent forms.

* ``host``: timm's own eval transform (PIL resize, crop, normalise) applied per image in
  DataLoader workers. Exact, but about 3 ms of CPU per image.
* ``device``: workers only decode to uint8; resize, centre crop and normalisation run in batches
  on the device. The resize for each distinct input size is a pair of small interpolation
  matrices holding Pillow's own weights in its fixed point (bilinear and bicubic computed as
  Resample.c computes them; other filters read off a resize of an identity image), and each pass
  is rounded and clipped to 8 bits as Pillow does, so bilinear and bicubic resizes give timm's
  transform pixel for pixel (the same features a fine-tune's probe computes with timm's transform).
  Images larger than the resize target are downscaled in the worker with Pillow (exact, and it
  bounds memory).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from torchvision import transforms as T
from torchvision.transforms.functional import InterpolationMode

__all__ = ["Geometry", "eval_transform", "DevicePreprocessor"]

_PIL_FILTERS = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
}


def eval_transform(model: torch.nn.Module, img_size: int | None = None) -> tuple[dict, T.Compose]:
    """timm's data config for ``model`` (optionally at ``img_size``) and its eval transform."""
    args = {"input_size": (3, img_size, img_size)} if img_size else None
    config = resolve_model_data_config(model, args=args)
    return config, create_transform(**config, is_training=False)


@dataclass(frozen=True)
class Geometry:
    """The resize / crop / normalise steps of a timm eval transform."""

    resize: int | tuple[int, int]  # torchvision Resize size (int: shortest side)
    max_size: int | None  # torchvision Resize max_size
    interpolation: str  # torchvision InterpolationMode value
    crop: tuple[int, int]  # centre crop (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_transform(cls, tf: T.Compose) -> "Geometry | None":
        """Read the steps from ``tf``; None if it holds anything else (then use ``host``)."""
        steps = list(tf.transforms)
        names = [type(s).__name__ for s in steps]
        if names != ["Resize", "CenterCrop", "MaybeToTensor", "Normalize"] and names != ["Resize", "CenterCrop", "ToTensor", "Normalize"]:
            return None
        resize, crop, _, norm = steps
        size = resize.size if isinstance(resize.size, int) else tuple(resize.size)
        if isinstance(size, tuple) and len(size) == 1:
            size = size[0]
        return cls(
            resize=size,
            max_size=resize.max_size,
            interpolation=InterpolationMode(resize.interpolation).value,
            crop=tuple(int(c) for c in crop.size),
            mean=tuple(float(m) for m in norm.mean),
            std=tuple(float(s) for s in norm.std),
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after torchvision's Resize, exactly as it computes it."""
        from torchvision.transforms.functional import _compute_resized_output_size

        size = [self.resize] if isinstance(self.resize, int) else list(self.resize)
        h, w = _compute_resized_output_size((height, width), size, self.max_size)
        return int(h), int(w)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


_PRECISION_BITS = 22  # Pillow's fixed-point weights for 8-bit images (Resample.c: 32 - 8 - 2)


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


# Pillow's filters as Resample.c defines them: (support, function); others are read off a resize of an identity image
_FILTERS = {Image.Resampling.BILINEAR: (1.0, lambda x: np.maximum(1 - np.abs(x), 0.0)), Image.Resampling.BICUBIC: (2.0, _bicubic)}


def _pil_weights(n_in: int, n_out: int, resample) -> np.ndarray:
    """[n_out, n_in] float64 weights of Pillow's 1-D resampling, computed as Resample.c's precompute_coeffs does."""
    if resample not in _FILTERS:
        eye = Image.fromarray(np.eye(n_in, dtype=np.float32), mode="F")
        return np.asarray(eye.resize((n_in, n_out), resample), dtype=np.float64)
    support, kernel = _FILTERS[resample]
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support *= filterscale
    m = np.zeros((n_out, n_in))
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        w = kernel((np.arange(xmin, xmax) - center + 0.5) / filterscale)
        m[xx, xmin:xmax] = w / w.sum() if w.sum() != 0 else w
    return m


def _pil_matrix(n_in: int, n_out: int, resample) -> np.ndarray:
    """[n_out, n_in] matrix of Pillow's 1-D resampling weights for 8-bit images in its fixed point (integers scaled by
    2**22, rounded half away from zero as Resample.c's normalize_coeffs_8bpc does), as float64."""
    k = _pil_weights(n_in, n_out, resample) * (1 << _PRECISION_BITS)
    return np.where(k < 0, np.ceil(k - 0.5), np.floor(k + 0.5))


class DevicePreprocessor:
    """timm's eval transform as batched tensor ops on any device.

    ``host_prepare`` runs in DataLoader workers on a decoded PIL image and returns uint8 CHW;
    calling the object on a list of those returns the normalised float batch on ``device``.
    """

    def __init__(self, geometry: Geometry):
        self.g = geometry
        self._mats: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._norm: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def resample(self):
        return _PIL_FILTERS[InterpolationMode(self.g.interpolation)]

    def host_prepare(self, img: Image.Image) -> torch.Tensor:
        """uint8 [3, H, W]; images larger than the resize target are resized here with Pillow."""
        h, w = self.g.resized_size(img.height, img.width)
        if h < img.height or w < img.width:
            img = img.resize((w, h), self.resample)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def _matrices(self, h: int, w: int, device: torch.device):
        key = (h, w, str(device))
        if key not in self._mats:
            rh, rw = self.g.resized_size(h, w)
            ch, cw = self.g.crop
            if (rh, rw) == (h, w):
                my, mx = np.eye(h) * (1 << _PRECISION_BITS), np.eye(w) * (1 << _PRECISION_BITS)
            else:
                my, mx = _pil_matrix(h, rh, self.resample), _pil_matrix(w, rw, self.resample)
            # torchvision center_crop: offsets int(round((size - crop) / 2)); pads with zeros if smaller
            my, mx = _crop_rows(my, ch), _crop_rows(mx, cw)
            self._mats[key] = (torch.tensor(my, device=device), torch.tensor(mx, device=device))
        return self._mats[key]

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
        """Normalised float32 batch [B, 3, crop_h, crop_w] on ``device``."""
        device = torch.device(device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(im.shape[1:]), []).append(i)
        parts, order = [], []
        for (h, w), idx in groups.items():
            batch = torch.stack([images[i] for i in idx])
            if device.type == "cuda":
                batch = batch.pin_memory()
            parts.append(self._resize_crop(batch.to(device, non_blocking=True), h, w))
            order += idx
        out = parts[0] if len(parts) == 1 else torch.cat(parts)[torch.argsort(torch.as_tensor(order, device=device))]
        scale, bias = self._scale_bias(device)
        return out.mul_(scale).add_(bias)

    def _resize_crop(self, batch: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Pillow's two passes (horizontal, then vertical), each a matmul with its fixed-point weights, each rounded and
        clipped to 8 bits as Pillow does (float64 holds the integer sums exactly); crop folded in. 8-bit values as float32."""
        ch, cw = self.g.crop
        if self.g.resized_size(h, w) == (h, w) and h >= ch and w >= cw:  # resized in the worker already: the crop alone
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            return batch[:, :, top: top + ch, left: left + cw].float()
        my, mx = self._matrices(h, w, batch.device)
        b, c = batch.shape[:2]
        x = _to_8bit(batch.double().reshape(b * c * h, w) @ mx.T).reshape(b * c, h, -1)  # horizontal pass
        return _to_8bit(torch.matmul(my, x)).float().reshape(b, c, my.shape[0], mx.shape[0])  # vertical pass

    def _scale_bias(self, device: torch.device):
        key = str(device)
        if key not in self._norm:
            mean, std = torch.tensor(self.g.mean), torch.tensor(self.g.std)
            scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(device)
            bias = (-mean / std).view(1, 3, 1, 1).to(device)
            self._norm[key] = (scale, bias)
        return self._norm[key]


def _to_8bit(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8: the fixed-point sums rounded half up to integers, clipped to 0..255."""
    return sums.add_(1 << (_PRECISION_BITS - 1)).div_(1 << _PRECISION_BITS).floor_().clamp_(0, 255)


def _crop_rows(m: np.ndarray, size: int) -> np.ndarray:
    n = m.shape[0]
    if n >= size:
        top = int(round((n - size) / 2.0))
        return m[top : top + size]
    pad_top = (size - n) // 2
    out = np.zeros((size, m.shape[1]), dtype=m.dtype)
    out[pad_top : pad_top + n] = m
    return out
