"""Decode image files safely: the content decides the format; what cannot be trusted is a reason."""

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
