"""Robust image decoding: every odd file either becomes an RGB image or a :class:`BadImage`.

Handles zero-byte and truncated files, non-images with image extensions, EXIF rotation,
grayscale/palette/alpha/CMYK/16-bit modes and Pillow's decompression-bomb guard.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImage

__all__ = ["open_image", "decode_image", "to_rgb", "IMG_EXTENSIONS", "looks_like_image_folder"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def looks_like_image_folder(path: str | Path, depth: int = 3, budget: int = 2000) -> bool:
    """True for a folder with image files in it or up to ``depth`` levels down (``<split>/<class>/<image>``), looking at
    no more than ``budget`` entries: what a user passed where a store or a head folder was expected."""
    folders = [Path(path)] if Path(path).is_dir() else []
    for _ in range(depth):
        below = []
        for folder in folders:
            try:
                entries = list(os.scandir(folder))[:budget]
            except OSError:
                continue
            budget -= len(entries)
            if any(e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file() for e in entries):
                return True
            below += [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")]
            if budget <= 0:
                return False
        folders = below
    return False


def open_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully into an RGB image, or raise :class:`BadImage` with the reason."""
    return _decode(Path(path))


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes held in memory (a tar member, a file read once to hash it) like :func:`open_image`."""
    return _decode(io.BytesIO(data))


def _decode(file: Path | io.BytesIO) -> Image.Image:
    try:
        if (file.stat().st_size if isinstance(file, Path) else file.getbuffer().nbytes) == 0:
            raise BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large for Pillow's decompression-bomb guard ({e}); raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted") from None
    except UnidentifiedImageError:
        raise BadImage("not a readable image (unknown format or corrupt header)") from None
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"truncated or corrupt image: {e}") from None
    except Exception as e:  # Pillow plugins raise many types on hostile files (struct.error, TypeError, ...)
        raise BadImage(f"cannot decode ({type(e).__name__}: {e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if mode == "F" and a.max(initial=0) <= 1.0:
            hi = 1.0
        a = np.clip(np.rint(a * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
