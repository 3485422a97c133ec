"""The bundled demo sample: Open Images-style annotations for photos that ship with scikit-image.

Image ids are the first 16 hex digits of the SHA-1 of the scikit-image image name, so they have the
Open Images form. The boxes exercise every rule: the cat, the coffee cup and the horse become
subjects; the astronaut and the cameraman fall to the human rule, the coins to the group rule,
the rocket to the aspect rule, the clock to the area rule, the table under the cup to the cluttered rule.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def demo_annotations() -> tuple[Path, Path]:
    """(box annotations CSV, class descriptions CSV) of the bundled demo sample."""
    folder = resources.files("blipdiff.datasets").joinpath("samples")
    return Path(str(folder.joinpath("demo-boxes.csv"))), Path(str(folder.joinpath("demo-classes.csv")))
