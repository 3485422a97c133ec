"""Test helpers: the real data in ../shared, builders for small Open Images box files and build folders."""

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


PAIR_LABELS = ["dog", "cat", "red backpack", "teddy bear", "clock", "vase"]


def write_pairs(folder: Path, count: int = 6) -> Path:
    """A build folder as `blipdiff build` leaves it for training: pairs.parquet and its target and input photos."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for index in range(count):
        image_id = f"{index:016x}"
        paths = {}
        for kind, (width, height) in (("target", (48, 40)), ("input", (30, 36))):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            pixels[4:20, 4:20] = (40 * index, 200, 30)
            paths[kind] = f"{kind}/{image_id[:2]}/{image_id}.jpg"
            (folder / paths[kind]).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / paths[kind])
        label = PAIR_LABELS[index % len(PAIR_LABELS)]
        rows.append({"image_id": image_id, "label_name": label, "caption": f"a photo of a {label}",
                     "captions": [f"a photo of a {label}", f"a {label} on the grass"],
                     "target_path": paths["target"], "input_path": paths["input"]})
    pq.write_table(pa.Table.from_pylist(rows), folder / "pairs.parquet")
    return folder
