"""Image loading edge cases: orientation, alpha, palettes, 16-bit, CMYK, grey, broken files, LLaVA padding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from saisa.data.images import ImageLoadError, background_from_mean, expand_to_square, load_image


def _saved(img: Image.Image, path, fmt: str = "PNG", **kw):
    img.save(path, fmt, **kw)
    return path


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(_saved(img, tmp_path / "rot.jpg", "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40) and out.mode == "RGB"
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # left went to the top


def test_rgba_and_la_are_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 255, 0, 0))  # fully transparent green must not show
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black over white -> grey
    out = load_image(_saved(rgba, tmp_path / "a.png"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((2, 2)) == (255, 0, 0)
    assert all(abs(c - 127) <= 2 for c in out.getpixel((1, 0)))
    la = Image.new("LA", (2, 2), (0, 0))
    assert load_image(_saved(la, tmp_path / "la.png")).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 255, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    p.putpixel((0, 0), 0)
    out = load_image(_saved(p, tmp_path / "opaque.png"))
    assert out.getpixel((0, 0)) == (0, 255, 0) and out.getpixel((1, 1)) == (255, 0, 0)
    out = load_image(_saved(p, tmp_path / "trans.png", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)
    gif = load_image(_saved(p, tmp_path / "trans.gif", "GIF", transparency=0))
    assert gif.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    path = _saved(Image.fromarray(a), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    out = load_image(path)
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    mode_i = Image.fromarray(a.astype(np.int32))  # mode "I"
    assert load_image(mode_i).getpixel((2, 0)) == (255, 255, 255)


def test_cmyk_grey_and_bilevel(tmp_path):
    cmyk = load_image(_saved(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), tmp_path / "c.jpg", "JPEG"))
    r, g, b = cmyk.getpixel((1, 1))
    assert cmyk.mode == "RGB" and r > 230 and g < 30 and b < 30
    grey = load_image(_saved(Image.new("L", (3, 3), 77), tmp_path / "l.png"))
    assert grey.getpixel((0, 0)) == (77, 77, 77)
    assert load_image(_saved(Image.new("1", (3, 3), 1), tmp_path / "b.png")).getpixel((0, 0)) == (255, 255, 255)


def test_sources_bytes_dict_and_pil(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), (1, 2, 3)).save(buf, "PNG")
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (1, 2, 3)
    assert load_image({"bytes": buf.getvalue(), "path": None}).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(Image.new("RGBA", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file_fails_with_path(tmp_path, fmt, suffix):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    path = _saved(img, tmp_path / f"whole.{suffix}", fmt)
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageLoadError, match=rf"truncated or corrupt: .*cut\.{suffix}"):
        load_image(cut)


def test_corrupt_and_missing_files_fail_with_path(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImageLoadError, match=r"not a readable image .*bad\.jpg"):
        load_image(bad)
    with pytest.raises(ImageLoadError, match=r"image not found: .*nope\.png"):
        load_image(tmp_path / "nope.png")


def test_load_truncated_images_flag_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(Image.new("RGB", (2, 2)))


def test_expand_to_square_llava_pad():
    bg = background_from_mean((0.48145466, 0.4578275, 0.40821073))  # CLIP's mean, as LLaVA-1.5 pads
    assert bg == (122, 116, 104)
    wide = expand_to_square(Image.new("RGB", (10, 4), (255, 0, 0)), bg)
    assert wide.size == (10, 10) and wide.getpixel((5, 0)) == bg and wide.getpixel((5, 5)) == (255, 0, 0)
    assert wide.getpixel((5, 3)) == (255, 0, 0) and wide.getpixel((5, 2)) == bg  # pasted at (10 - 4) // 2 = 3
    tall = expand_to_square(Image.new("RGB", (3, 9), (0, 255, 0)), bg)
    assert tall.size == (9, 9) and tall.getpixel((0, 4)) == bg and tall.getpixel((3, 4)) == (0, 255, 0)
    square = Image.new("RGB", (5, 5))
    assert expand_to_square(square, bg) is square
