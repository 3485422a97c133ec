"""Test helpers: the real data in ../shared and builders for small Open Images box files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
V6_HEADER = [
    "ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax", "IsOccluded",
    "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside", "XClick1X", "XClick2X", "XClick3X",
    "XClick4X", "XClick1Y", "XClick2Y", "XClick3Y", "XClick4Y",
]
V13_HEADER = V6_HEADER[:13]

# A few real classes: the MIDs are Open Images'; the rules key on them.
CLASSES = {
    "/m/01yrx": "Cat",
    "/m/0bt9lr": "Dog",
    "/m/02p5f1q": "Coffee cup",
    "/m/0dv5r": "Camera",
    "/m/01g317": "Person",
    "/m/09j2d": "Clothing",
    "/m/07j7r": "Tree",
    "/m/04bcr3": "Table",
    "/m/0cmx8": "Spoon",
}


def shared_path(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data absent: {path} (see ../shared/README.md)")
    return path


def box(image: str, mid: str, x_min=0.1, x_max=0.8, y_min=0.1, y_max=0.7, group=0, inside=0) -> dict:
    """One box row; the default box has area 0.42 and aspect 1.17, so it passes every box rule."""
    return {
        "ImageID": image, "Source": "xclick", "LabelName": mid, "Confidence": "1",
        "XMin": x_min, "XMax": x_max, "YMin": y_min, "YMax": y_max, "IsOccluded": "0",
        "IsTruncated": "0", "IsGroupOf": group, "IsDepiction": "0", "IsInside": inside,
    }
