"""Near-duplicates of real images, as they arise in scraped data sets: resized, re-encoded at another JPEG
quality, slightly cropped, mirrored (the CIFAR-10 JPEGs themselves are quality-75 files of 32 x 32 pixels).

``near_duplicate`` gives every copy a seeded, non-empty combination of the four transformations (each with
probability one half), so a benchmark sees single changes and their combinations. ``VARIANTS`` are single
transformations at fixed strengths, milder and harsher than those, to show where copies stop being found.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

TRANSFORMS = ("resize", "jpeg", "crop", "flip")
RESIZE_SCALES = (0.75, 1.5, 2.0)  # of the side
JPEG_QUALITIES = (85, 95)  # the originals are quality 75
CROP_PIXELS = 1  # off each of 1-4 random sides of a 32-pixel image: at most 6% of a side


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _resize(im: Image.Image, scale: float) -> Image.Image:
    return im.resize((max(8, round(im.width * scale)), max(8, round(im.height * scale))), Image.BICUBIC)


def _crop(im: Image.Image, sides: tuple[int, int, int, int]) -> Image.Image:
    left, top, right, bottom = sides
    return im.crop((left, top, im.width - right, im.height - bottom))


def near_duplicate(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, list[str]]:
    """(a near-duplicate of ``image``, the transformations applied, in order)."""
    chosen = [t for t in TRANSFORMS if rng.random() < 0.5] or [TRANSFORMS[int(rng.integers(len(TRANSFORMS)))]]
    out = image.convert("RGB")
    for t in chosen:
        if t == "crop":
            sides = rng.random(4) < 0.5
            sides[int(rng.integers(4))] = True
            out = _crop(out, tuple(int(s) * CROP_PIXELS for s in sides))
        elif t == "resize":
            out = _resize(out, float(rng.choice(RESIZE_SCALES)))
        elif t == "flip":
            out = ImageOps.mirror(out)
        elif t == "jpeg":
            out = _jpeg(out, int(rng.choice(JPEG_QUALITIES)))
    return out, chosen


# name -> single transformation at a fixed strength (per-strength recall, calibration section)
VARIANTS = {
    "flip": ImageOps.mirror,
    "resize 0.75x": lambda im: _resize(im, 0.75), "resize 1.5x": lambda im: _resize(im, 1.5), "resize 2x": lambda im: _resize(im, 2.0),
    "crop 1 px a side": lambda im: _crop(im, (1, 1, 1, 1)), "crop 2 px a side": lambda im: _crop(im, (2, 2, 2, 2)),
    "crop 3 px a side": lambda im: _crop(im, (3, 3, 3, 3)),
    "JPEG q30": lambda im: _jpeg(im, 30), "JPEG q50": lambda im: _jpeg(im, 50), "JPEG q70": lambda im: _jpeg(im, 70),
    "JPEG q85": lambda im: _jpeg(im, 85), "JPEG q95": lambda im: _jpeg(im, 95),
}


def _save(image: Image.Image, target: Path) -> Path:
    """PNG: the pixels as made (a JPEG save would re-encode them once more). A file that already holds these bytes is
    left alone, so a rerun keeps its file stamps and the store extracted from it stays a cache hit."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    if not target.is_file() or target.read_bytes() != buf.getvalue():
        target.write_bytes(buf.getvalue())
    return target


def write_near_duplicates(originals: list[Path], folder: Path, seed: int) -> list[tuple[Path, list[str]]]:
    """A near-duplicate of every file of ``originals`` written to ``folder``; returns (path, transformations) per copy."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, path in enumerate(originals):
        with Image.open(path) as im:
            copy, applied = near_duplicate(im, rng)
        out.append((_save(copy, folder / f"{i:05d}.png"), applied))
    return out


def write_variants(originals: list[Path], folder: Path) -> list[tuple[Path, str, int]]:
    """Every variant of every original; returns (path, variant name, index of the original)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, path in enumerate(originals):
        with Image.open(path) as im:
            im = im.convert("RGB")
            for v, (name, make) in enumerate(VARIANTS.items()):
                out.append((_save(make(im), folder / f"{i:05d}-{v:02d}.png"), name, i))
    return out
