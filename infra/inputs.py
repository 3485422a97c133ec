"""Checks and normal forms of the inputs that the commands share (generate, finetune, pretrain, latents), for their
configuration models: each raises ValueError with the message the command line shows."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field


def named_subject(value: str) -> str:
    if not value.strip():
        raise ValueError("the subject is empty: name its category, e.g. dog")
    return value.strip()


def one_word(value: str) -> str:
    """DreamBooth's identifier: one token-like word."""
    if not value or any(character.isspace() for character in value):
        raise ValueError(f"the identifier {value!r} must be one word, without spaces (e.g. sks)")
    return value


def multiple_of_eight(value: int) -> int:
    if value % 8:
        raise ValueError(f"{value} is not a multiple of 8 (the VAE downsamples by 8)")
    return value


def build_folder(folder: Path) -> Path:
    """A folder that ``blipdiff build --out`` made (it has pairs.parquet), as an absolute path: the Ray
    workers that read it run in other folders, on other nodes that see the same paths."""
    if not (folder / "pairs.parquet").is_file():
        raise ValueError(f"{folder} has no pairs.parquet: give a build folder (blipdiff build --out)")
    return folder.resolve()


def readable_image(path: Path) -> None:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from error


def find_photos(paths: list[Path]) -> list[Path]:
    """Every photo that ``paths`` names, folders expanded (their image files, sorted); an error names what
    is missing or unreadable, or says that there are none."""
    from blipdiff.infra.images import IMAGE_SUFFIXES

    photos: list[Path] = []
    for path in paths:
        if path.is_dir():
            photos += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            photos.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    if not photos:
        raise ValueError(f"no photos in {', '.join(map(str, paths))}")
    for photo in photos:
        readable_image(photo)
    return photos


def model_location(model: str) -> str:
    """A local checkpoint folder as an absolute path (a rerun from elsewhere names the same one); a hub
    id as it is."""
    folder = Path(model).expanduser()
    return str(folder.resolve()) if folder.exists() else model


# The checks as types, for the configuration models' fields.
ImageSide = Annotated[int, Field(ge=8), AfterValidator(multiple_of_eight)]
SubjectText = Annotated[str, AfterValidator(named_subject)]
Identifier = Annotated[str, AfterValidator(one_word)]
BuildFolder = Annotated[Path, AfterValidator(build_folder)]
