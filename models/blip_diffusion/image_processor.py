"""Reference-image preprocessing and output postprocessing, as the released checkpoint's
``image_processor`` (``preprocessor_config.json``) describes them.

The released pipeline resizes straight to the configured size (224×224: the aspect ratio is not kept),
bicubic with Pillow, scales to [0, 1] and normalises with the mean and std of ``model_index.json``
(CLIP's). LAVIS and the authors' training code centre-crop instead: a different image, and a
different subject embedding, so the checkpoint's own recipe is the one followed here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Image.Image | np.ndarray | str | os.PathLike


def open_rgb(image: ImageInput) -> Image.Image:
    """A PIL image, an HxWx3 uint8 array or an image file, as an RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"an image array must be HxWx3 (or 4) uint8, not {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, an array or a path, not {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_center_crop(image: Image.Image, side: int) -> Image.Image:
    """Resize the shorter side to ``side`` (bicubic), then crop the centre square: the training targets'
    transform (and LAVIS's evaluation transform for subject photos)."""
    scale = side / min(image.size)
    resized = image.resize((max(side, round(image.width * scale)), max(side, round(image.height * scale))),
                           Image.Resampling.BICUBIC)
    left, top = (resized.width - side) // 2, (resized.height - side) // 2
    return resized.crop((left, top, left + side, top + side))


def to_signed_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a [3, H, W] float32 tensor in [-1, 1], the VAE's input."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


@dataclass
class SubjectImageProcessor:
    height: int = 224
    width: int = 224
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    # The file as read, so that saving keeps the keys this class does not use.
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict[str, Any], mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> SubjectImageProcessor:
        """``mean``/``std`` from ``model_index.json`` override the file's, as the released pipeline does."""
        size = config.get("size", {"height": 224, "width": 224})
        if "height" not in size:
            raise ValueError(f"image_processor: expected a {{height, width}} size, got {size}")
        if config.get("do_resize", True) is False or config.get("do_rescale", True) is False \
                or config.get("do_normalize", True) is False:
            raise ValueError("image_processor: resizing, rescaling and normalising cannot be turned off for this model")
        return cls(height=size["height"], width=size["width"], resample=config.get("resample", Image.Resampling.BICUBIC),
                   rescale_factor=config.get("rescale_factor", 1 / 255),
                   mean=tuple(mean if mean is not None else config.get("image_mean", CLIP_MEAN)),
                   std=tuple(std if std is not None else config.get("image_std", CLIP_STD)), config=dict(config))

    def to_config(self) -> dict[str, Any]:
        return {**self.config, "do_resize": True, "do_rescale": True, "do_normalize": True,
                "do_convert_rgb": True, "do_center_crop": self.config.get("do_center_crop", True),
                "size": {"height": self.height, "width": self.width}, "resample": int(self.resample),
                "rescale_factor": self.rescale_factor, "image_mean": list(self.mean), "image_std": list(self.std),
                "image_processor_type": "BlipImageProcessor"}

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images → [N, 3, height, width] float32."""
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        arrays = []
        for image in images:
            resized = open_rgb(image).resize((self.width, self.height), resample=self.resample)
            scaled = (np.asarray(resized, dtype=np.float64) * self.rescale_factor).astype(np.float32)
            arrays.append(((scaled - mean) / std).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(arrays))


def postprocess(decoded: torch.Tensor, output_type: str) -> torch.Tensor | np.ndarray | list[Image.Image]:
    """VAE output in [-1, 1] → ``"pt"`` [N, 3, H, W] or ``"np"`` [N, H, W, 3] floats in [0, 1], or ``"pil"`` images."""
    images = (decoded.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    return [Image.fromarray(frame) for frame in (array * 255).round().astype(np.uint8)]
