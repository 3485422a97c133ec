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


# The demo benchmark's prompts, ours (DreamBench's own are data, read from the user's copy): the same
# form and kinds as DreamBench's lists, objects 20 re-contextualisations + 5 properties, live subjects
# 10 + 10 accessorisations + 5 properties.
_PLACES = ("on a wooden table", "on the beach", "in a garden", "on a snowy hill", "in a kitchen", "on a bookshelf",
           "under a tree", "in a forest", "on a city street", "next to a lake", "on a windowsill", "in the desert",
           "on a mountain top", "in a library", "on a picnic blanket", "under the stars", "in the rain",
           "on a red carpet", "in a museum", "on the moon")
_ACCESSORIES = ("wearing a red hat", "wearing a scarf", "wearing sunglasses", "with a bow tie", "wearing a crown",
                "in a raincoat", "with a backpack", "wearing a chef hat", "in a superhero cape", "wearing boots")
_PROPERTIES = ("blue", "green", "golden", "wooden", "tiny")
# Subject → (class, scikit-image photo): the three the demo's filter keeps, or stand-ins of their kind.
DEMO_SUBJECTS = {"cat": ("cat", "chelsea"), "cup": ("cup", "coffee"), "rocket": ("rocket", "rocket")}


def _prompt_list(templates: list[str]) -> list[str]:
    return ["prompt_list = ["] + [f"'{template}'.format(unique_token, class_token)," for template in templates] + ["]"]


def write_demo_dreambench(folder: Path) -> Path:
    """A small benchmark in DreamBench's layout from the bundled photos: three subjects of three photos each
    (the photo, and its left and right crops mirrored), and prompt lists of our own in DreamBench's form."""
    from skimage import data

    for subject, (_, photo) in DEMO_SUBJECTS.items():
        image = Image.fromarray(getattr(data, photo)()).convert("RGB")
        width, height = image.size
        views = (image, image.crop((0, 0, width * 3 // 4, height)).transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                 image.crop((width // 4, 0, width, height)).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        for index, view in enumerate(views):
            _write(np.asarray(view), folder / subject / f"{index:02d}.jpg")
    objects = [f"a {{0}} {{1}} {place}" for place in _PLACES] + [f"a {colour} {{0}} {{1}}" for colour in _PROPERTIES]
    live = ([f"a {{0}} {{1}} {place}" for place in _PLACES[:10]] + [f"a {{0}} {{1}} {item}" for item in _ACCESSORIES]
            + [f"a {colour} {{0}} {{1}}" for colour in _PROPERTIES])
    lines = (["Classes", "", "subject_name,class", *(f"{name},{cls}" for name, (cls, _) in DEMO_SUBJECTS.items()), "",
              "Prompts", "", "Object Prompts", "", *_prompt_list(objects), "", "Live Subject Prompts", "",
              *_prompt_list(live), ""])
    with atomic_path(folder / "prompts_and_classes.txt") as temp:
        temp.write_text("\n".join(lines), encoding="utf-8")
    return folder
