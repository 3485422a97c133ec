"""Backgrounds for the synthetic inputs: a deterministic random crop per (seed, image id)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from blipdiff.infra.images import IMAGE_SUFFIXES, DecodeFailure, decode_image

# A crop covers between half and all of the largest window of the image's aspect ratio that fits.
CROP_SCALE = (0.5, 1.0)


@dataclass(frozen=True)
class BackgroundChoice:
    name: str
    x: int
    y: int
    width: int
    height: int


def list_backgrounds(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name, so that a seed means the same draw."""
    if not Path(folder).is_dir():
        raise ValueError(f"backgrounds folder not found: {folder}")
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no background images in {folder}")
    return files


def background_for(
    backgrounds: list[Path], seed: int, image_id: str, width: int, height: int
) -> tuple[np.ndarray, BackgroundChoice]:
    """Draw a background and a crop of it for one image and resize it to (width, height).

    The draw depends only on the seed and the image id, so reruns and other workers agree.
    """
    rng = np.random.default_rng([seed, int(image_id, 16)])
    path = backgrounds[int(rng.integers(len(backgrounds)))]
    try:
        pixels = decode_image(path)
    except DecodeFailure as failure:
        raise DecodeFailure(f"background {path.name}: {failure}") from failure
    bg_height, bg_width = pixels.shape[:2]
    aspect = width / height
    fit_width = min(bg_width, bg_height * aspect)
    scale = rng.uniform(*CROP_SCALE)
    crop_width = max(1, int(round(fit_width * scale)))
    crop_height = max(1, min(bg_height, int(round(crop_width / aspect))))
    x = int(rng.integers(0, bg_width - crop_width + 1))
    y = int(rng.integers(0, bg_height - crop_height + 1))
    crop = pixels[y : y + crop_height, x : x + crop_width]
    interpolation = cv2.INTER_AREA if crop_width > width else cv2.INTER_LINEAR
    resized = cv2.resize(crop, (width, height), interpolation=interpolation)
    return resized, BackgroundChoice(path.name, x, y, crop_width, crop_height)
