"""Pixel verification of near-duplicate candidates: the second stage of the near-duplicate check.

The embeddings propose candidate pairs (cosine in a band below the strict threshold); the images of each
candidate are then compared pixel by pixel. Copies that the backbone sees as other images (a small image
downscaled or re-encoded, then enlarged to the backbone's input) keep their pixels; two different photographs
of a similar scene do not. Each image becomes a small grayscale signature: resized to 32 x 32, band-passed by a
difference of Gaussians (fine detail that both a downscaled copy and its original keep, without the overall
brightness and layout that similar scenes share), centred and scaled to unit length. A pair's pixel similarity
is the normalized cross-correlation of the two signatures, the higher of the image and its mirror (a flipped
copy is a copy).
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import BadImage

__all__ = ["SIGNATURE_PX", "pixel_signature", "pixel_similarities", "fallback_note"]

_logger = logging.getLogger(__name__)

SIGNATURE_PX = 32  # side of the grayscale signature
_FINE_SIGMA, _COARSE_SIGMA = 0.7, 3.0  # pixels of the signature: the band kept by the difference of Gaussians


def pixel_signature(image) -> np.ndarray:
    """[32, 32] float32 band-passed grayscale of a PIL image, zero mean, unit length (all zeros for a flat image)."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    gray = np.asarray(image.convert("L").resize((SIGNATURE_PX, SIGNATURE_PX), Image.BICUBIC), dtype=np.float64)
    band = gaussian_filter(gray, _FINE_SIGMA) - gaussian_filter(gray, _COARSE_SIGMA)
    band -= band.mean()
    norm = np.linalg.norm(band)
    return (band / norm if norm > 1e-9 else np.zeros_like(band)).astype(np.float32)


class _Signatures:
    """Signatures of the store's rows, read from an image source by id once each (None: not in the source, unreadable)."""

    def __init__(self, src, ids: np.ndarray):
        self.src, self.ids, self.cache = src, ids, {}
        self.index = {image_id: i for i, image_id in enumerate(src.ids)}

    def __call__(self, row: int) -> np.ndarray | None:
        if row not in self.cache:
            i = self.index.get(str(self.ids[row]))
            try:
                self.cache[row] = None if i is None else pixel_signature(self.src.load(i))
            except BadImage:
                self.cache[row] = None
        return self.cache[row]


def pixel_similarities(src, ids: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """[m] pixel similarity of each row pair ([m, 2] row numbers) in [-1, 1]; NaN where an image cannot be read.

    Signatures are held for the rows of the pairs only (4 KB each)."""
    signature = _Signatures(src, ids)
    out = np.full(len(pairs), np.nan)
    for n, (a, b) in enumerate(pairs):
        sa, sb = signature(int(a)), signature(int(b))
        if sa is not None and sb is not None:
            out[n] = max(float((sa * sb).sum()), float((sa * sb[:, ::-1]).sum()))
    return out


def fallback_note(thumbnail_note: str, threshold: float) -> str:
    """The one line that says the near-duplicates fall back to the embeddings alone, and why (the thumbnails' reason)."""
    reason = thumbnail_note.removeprefix("thumbnails left out: ")
    return f"thumbnails and pixel verification left out: {reason}; near-duplicates by cosine >= {threshold:g} alone"
