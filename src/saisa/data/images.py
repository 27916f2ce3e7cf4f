"""Image loading that either returns an 8-bit RGB picture the right way up or fails with the file's path.

Unusual here: nothing is forgiven silently. `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` must stay False (a truncated JPEG
would otherwise train as a grey half-image) and every image is decoded in full with `.load()` inside the error
handler, because `Image.open` only reads the header. Modes a vision tower cannot take are converted explicitly:
EXIF orientation applied; alpha (RGBA, LA, PA, P or L/RGB with a transparency key) composited on white rather than
dropped (dropping exposes whatever colour the transparent pixels happen to store); 16-bit grey (I;16*, I) scaled by
1/257 instead of clipped; CMYK, grey and bilevel through Pillow's converters.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

WHITE = (255, 255, 255)
ImageSource = str | os.PathLike | bytes | BinaryIO | Image.Image | dict  # dict: HF datasets {"bytes", "path"}


class ImageLoadError(OSError):
    """An image is missing, truncated, corrupt or in a mode we cannot convert; the message names the file."""


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, dict):
        return source.get("path") or "<image bytes>"
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    return getattr(source, "name", None) or "<image bytes>"


def load_image(source: ImageSource, *, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Open, fully decode, orient and convert an image to 8-bit RGB.

    `source`: a path, raw bytes, a binary file, a PIL image, or an HF `datasets` image dict `{"bytes", "path"}`.
    Raises `ImageLoadError` naming the file for a missing, truncated or undecodable image.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (some library set it); truncated images would load silently "
            "with grey filler. Set it back to False and run `saisa data check` to find the broken files"
        )
    where = _describe(source)
    try:
        if isinstance(source, Image.Image):
            source.load()
            return to_rgb(ImageOps.exif_transpose(source), background=background)
        if isinstance(source, dict):
            source = source["bytes"] if source.get("bytes") is not None else source["path"]
        if isinstance(source, bytes):
            source = io.BytesIO(source)
        with Image.open(source) as img:
            img.load()
            return to_rgb(ImageOps.exif_transpose(img), background=background)
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {where}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"not a readable image (corrupt or unknown format): {where}") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"image too large to decode safely ({e}): {where}") from None
    except ImageLoadError as e:
        raise ImageLoadError(f"{e}: {where}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # Pillow reports truncation and bad data this way
        raise ImageLoadError(f"cannot decode image ({e}); the file is truncated or corrupt: {where}") from None


def to_rgb(img: Image.Image, *, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on `background`."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        # 16-bit (PNG/TIFF) grey: full range 0..65535 -> 0..255. Mode "I" is assumed to hold 16-bit data as well.
        a = np.asarray(img).astype(np.float64)
        a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if mode == "F":
        raise ImageLoadError("float images (mode F) have no agreed value range; convert them to 8-bit first")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


def background_from_mean(image_mean: Sequence[float]) -> tuple[int, int, int]:
    """LLaVA-1.5's pad colour: the image processor's normalisation mean in 0..255."""
    if len(image_mean) != 3:
        raise ValueError(f"image_mean must have 3 channels, got {list(image_mean)}")
    return tuple(int(x * 255) for x in image_mean)


def background_for(image_processor: Any) -> tuple[int, int, int]:
    """Pad colour for an HF image processor (its `image_mean`)."""
    mean = getattr(image_processor, "image_mean", None)
    if mean is None:
        raise ValueError(f"{type(image_processor).__name__} has no image_mean; pass the pad colour (background=) "
                         "explicitly for image_aspect_ratio='pad'")
    return background_from_mean(mean)


def expand_to_square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5 `pad` mode: centre the image on a square canvas of its longer side filled with `background`."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas
