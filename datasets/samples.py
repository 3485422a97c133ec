"""The bundled demo sample: Open Images-style annotations for photos that ship with scikit-image.

Image ids are the first 16 hex digits of the SHA-1 of the scikit-image image name, so they have the
Open Images form. The boxes exercise every rule: the cat, the coffee cup and the horse become
subjects; the astronaut and the cameraman fall to the human rule, the coins to the group rule,
the rocket to the aspect rule, the clock to the area rule, the table under the cup to the cluttered rule.
Backgrounds come from scikit-image too: its texture and microscope photos.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from blipdiff.infra.atomic import atomic_path

DEMO_PHOTOS = ("astronaut", "camera", "chelsea", "clock", "coffee", "coins", "horse", "rocket")
DEMO_BACKGROUNDS = ("brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry")


def demo_image_id(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:16]


def demo_annotations() -> tuple[Path, Path]:
    """(box annotations CSV, class descriptions CSV) of the bundled demo sample."""
    folder = resources.files("blipdiff.datasets").joinpath("samples")
    return Path(str(folder.joinpath("demo-boxes.csv"))), Path(str(folder.joinpath("demo-classes.csv")))


def write_demo_photos(images: Path, backgrounds: Path) -> None:
    """Write the demo photos as ``{image_id}.jpg`` and the backgrounds as PNG; existing files stay."""
    from skimage import data

    for name in DEMO_PHOTOS:
        _write(getattr(data, name)(), images / f"{demo_image_id(name)}.jpg")
    for name in DEMO_BACKGROUNDS:
        _write(getattr(data, name)(), backgrounds / f"{name}.png")


def _write(pixels: np.ndarray, path: Path) -> None:
    if path.exists():
        return
    image = Image.fromarray(pixels).convert("RGB")
    with atomic_path(path) as temp:
        image.save(temp, format="JPEG" if path.suffix == ".jpg" else "PNG", quality=95)
