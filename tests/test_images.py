"""Bad and odd image files: decoded to RGB or skipped with a reason, never fatal."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from featx.cli import main
from featx.errors import BadImage
from featx.images import open_image
from featx.store import FeatureStore

from conftest import write_image


def _jpeg_bytes(size=(64, 48), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_bytes(size=(30, 20)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_bad_inputs(folder) -> dict[str, str]:
    """Writes every bad input of issue 2 into ``folder``; returns {file name: 'ok' | 'skip'}."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}

    (folder / "zero.jpg").write_bytes(b"")
    expected["zero.jpg"] = "skip"
    (folder / "truncated.jpg").write_bytes(_jpeg_bytes()[:300])
    expected["truncated.jpg"] = "skip"
    (folder / "truncated.png").write_bytes(_png_bytes()[:200])
    expected["truncated.png"] = "skip"
    (folder / "text.jpg").write_text("this is not an image\n" * 20)
    expected["text.jpg"] = "skip"

    Image.new("L", (30, 20), 77).save(folder / "gray.png")
    expected["gray.png"] = "ok"
    pal = Image.new("P", (30, 20), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(folder / "palette.png", transparency=0)
    expected["palette.png"] = "ok"
    Image.new("RGBA", (30, 20), (0, 0, 255, 128)).save(folder / "rgba.png")
    expected["rgba.png"] = "ok"
    Image.new("LA", (30, 20), (50, 200)).save(folder / "la.png")
    expected["la.png"] = "ok"
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    expected["cmyk.jpg"] = "ok"
    Image.fromarray(np.full((20, 30), 30000, np.uint16)).save(folder / "deep16.png")
    expected["deep16.png"] = "ok"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (10, 120, 10)).save(folder / "exif.jpg", exif=exif.tobytes())
    expected["exif.jpg"] = "ok"
    write_image(folder / "big.png", (120, 120, 120), size=(64, 64))
    expected["big.png"] = "bomb"
    return expected


def test_odd_modes_become_rgb(tmp_path):
    write_bad_inputs(tmp_path)
    for name in ("gray.png", "palette.png", "rgba.png", "la.png", "cmyk.jpg", "deep16.png", "exif.jpg"):
        img = open_image(tmp_path / name)
        assert img.mode == "RGB", name
    # transparency is composited on white: half-transparent blue is light blue, fully transparent palette is white
    assert open_image(tmp_path / "rgba.png").getpixel((0, 0)) == pytest.approx((127, 127, 255), abs=2)
    assert open_image(tmp_path / "palette.png").getpixel((0, 0)) == (255, 0, 0)
    # CMYK (0, 255, 255, 0) is red
    r, g, b = open_image(tmp_path / "cmyk.jpg").getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60


def test_16_bit_is_scaled_not_saturated(tmp_path):
    Image.fromarray(np.full((20, 30), 30000, np.uint16)).save(tmp_path / "deep16.png")
    assert Image.open(tmp_path / "deep16.png").mode.startswith("I")
    value = open_image(tmp_path / "deep16.png").getpixel((3, 3))
    assert value == (117, 117, 117)  # 30000 / 65535 * 255, not clipped to 255


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert Image.open(tmp_path / "rot.jpg").size == (40, 20)
    assert open_image(tmp_path / "rot.jpg").size == (20, 40)


@pytest.mark.parametrize("name, reason", [
    ("zero.jpg", "empty file"),
    ("truncated.jpg", "truncated"),
    ("truncated.png", "truncated"),
    ("text.jpg", "not a readable image"),
])
def test_unreadable_files_raise_bad_image(tmp_path, name, reason):
    write_bad_inputs(tmp_path)
    with pytest.raises(BadImage, match=reason):
        open_image(tmp_path / name)


def test_missing_file_is_bad_image(tmp_path):
    with pytest.raises(BadImage, match="not found"):
        open_image(tmp_path / "nope.png")


def test_decompression_bomb_is_bad_image(tmp_path, monkeypatch):
    write_image(tmp_path / "big.png", (1, 2, 3), size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 x limit: Pillow raises
    with pytest.raises(BadImage, match="decompression-bomb"):
        open_image(tmp_path / "big.png")


def test_extract_completes_over_every_bad_input(tmp_path, monkeypatch, capsys):
    expected = write_bad_inputs(tmp_path / "src" / "odd")
    write_image(tmp_path / "src" / "fine" / "a.png", (200, 0, 0))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 'big.png' (4096 px) trips the guard; the rest are smaller
    out = tmp_path / "f.h5"
    rc = main(["extract", str(tmp_path / "src"), "--model", "test_resnet", "--weights", "random", "--out", str(out), "--workers", "0",
               "--batch-size", "4", "--no-progress"])
    assert rc == 0
    summary = capsys.readouterr().out
    n_skip = sum(v != "ok" for v in expected.values())
    assert f"{n_skip} skipped" in summary
    for reason in ("1 empty file", "2 truncated or corrupt image", "1 not a readable image", "decompression-bomb"):
        assert reason in summary
    with FeatureStore(out) as store:
        fs = store.read()
        skipped = dict(store.skipped())
    ok = {f"odd/{k}" for k, v in expected.items() if v == "ok"} | {"fine/a.png"}
    assert set(fs.ids) == ok
    assert set(skipped) == {f"odd/{k}" for k, v in expected.items() if v != "ok"}
    assert "decompression-bomb" in skipped["odd/big.png"] and "empty file" in skipped["odd/zero.jpg"]
    assert np.isfinite(fs.X).all()
