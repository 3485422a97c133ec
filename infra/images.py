"""Image files and boxes: decode safely (the content decides the format; what cannot be trusted is a
reason), and the box geometry that segmentation and matting share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own decompression-bomb threshold
# Pillow refuses to open anything larger (DecompressionBombError); between the two it only warns, and
# the configured limit decides.
MAX_DECODABLE_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
EXIF_ORIENTATION = 0x0112
_HTML_STARTS = (b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")
# x_min, x_max, y_min, y_max, normalised to [0, 1], as in Open Images.
Box = tuple[float, float, float, float]


class DecodeFailure(ValueError):
    """The file is missing, is not an image, is truncated, or is too large to decode safely."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def inspect_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Decode the whole file without keeping pixels; width and height as displayed (EXIF orientation)."""
    with _open_checked(path, max_pixels) as image:
        orientation = image.getexif().get(EXIF_ORIENTATION)
        _load(image)
        width, height = image.size
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        return ImageInfo(image.format or "unknown", width, height)


def decode_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode to 8-bit RGB (HxWx3 uint8) with EXIF orientation applied.

    L, LA, P, CMYK, YCbCr and RGBA convert to RGB (an alpha channel is dropped); 16-bit and 32-bit
    images are scaled to 8 bits rather than clipped.
    """
    with _open_checked(path, max_pixels) as image:
        _load(image)
        image = ImageOps.exif_transpose(image)
        return _to_rgb8(image)


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except FileNotFoundError as error:
        raise DecodeFailure("missing file") from error
    except OSError as error:
        raise DecodeFailure(f"unreadable file: {error.strerror or error}") from error
    if not head:
        raise DecodeFailure("empty file")
    if head.lstrip().lower().startswith(_HTML_STARTS):
        raise DecodeFailure("HTML page instead of an image")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise DecodeFailure(f"decompression bomb: {error}") from error
    except UnidentifiedImageError as error:
        raise DecodeFailure("not an image Pillow can identify") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise DecodeFailure(f"does not decode: {error}") from error
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise DecodeFailure(f"{width}x{height} exceeds the {max_pixels}-pixel limit")
    if width == 0 or height == 0:
        image.close()
        raise DecodeFailure("image has no pixels")
    return image


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise DecodeFailure(f"does not decode: {error}") from error


def _to_rgb8(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


def box_in_pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """Normalised (x_min, x_max, y_min, y_max) → pixel (x0, y0, x1, y1), half-open, at least 1 px."""
    x_min, x_max, y_min, y_max = box
    x0 = int(np.clip(np.floor(x_min * width), 0, width - 1))
    y0 = int(np.clip(np.floor(y_min * height), 0, height - 1))
    x1 = int(np.clip(np.ceil(x_max * width), x0 + 1, width))
    y1 = int(np.clip(np.ceil(y_max * height), y0 + 1, height))
    return x0, y0, x1, y1


def working_size(width: int, height: int, long_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down so the long side is at most ``long_side``; unchanged when None."""
    if long_side is None or max(width, height) <= long_side:
        return width, height
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))
