"""Segmentation stage of subject extraction: CLIPSeg's per-pixel probability of the subject's class.

The matting stage turns the map into a trimap. torch and transformers are imported inside the class,
so the command line can import this module cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from blipdiff.models import DEFAULT_CLIPSEG
from blipdiff.models.captioners import check_images, check_labels
from blipdiff.models.devices import resolve_device, torch_dtype

if TYPE_CHECKING:
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    from blipdiff.infra.images import Box


class ClipSegSegmenter:
    """CLIPSeg through transformers, prompted with the class name.

    ``model`` is a hub id or a local folder holding a CLIPSeg checkpoint and its processor. ``device``
    defaults to CUDA when available, else the CPU; ``dtype`` ("float16", "bfloat16" or "float32")
    to float16 on CUDA and float32 on the CPU; ``batch_size`` is images per forward pass.
    """

    def __init__(self, model: str = DEFAULT_CLIPSEG, *, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 16) -> None:
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        import torch

        resolved_device = torch.device(resolve_device(device))
        resolved_dtype = torch_dtype(dtype, resolved_device)
        network = CLIPSegForImageSegmentation.from_pretrained(model, dtype=resolved_dtype)
        self._bind(network.to(resolved_device), CLIPSegProcessor.from_pretrained(model), batch_size)

    @classmethod
    def from_modules(cls, network: CLIPSegForImageSegmentation, processor: CLIPSegProcessor, *,
                     batch_size: int = 16) -> ClipSegSegmenter:
        """Wrap a CLIPSeg model and processor already in memory, on the model's device and in its dtype
        (the GPU benchmark builds the real architecture with random weights this way)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        segmenter = cls.__new__(cls)
        segmenter._bind(network, processor, batch_size)
        return segmenter

    def _bind(self, network: CLIPSegForImageSegmentation, processor: CLIPSegProcessor, batch_size: int) -> None:
        self.network = network.eval()
        self.processor = processor
        self.batch_size = batch_size
        self.device = network.device
        self.dtype = network.dtype

    def probabilities(self, images: Sequence[np.ndarray], labels: Sequence[str],
                      boxes: Sequence[Box]) -> list[np.ndarray]:
        """Per image, a float32 (H, W) map in [0, 1]: the sigmoid of CLIPSeg's logits for the prompt
        "<class name, lower-cased>", upsampled bilinearly from the model's output (352x352 for the
        CIDAS checkpoints) to the image's own size.

        ``boxes`` (normalised x_min, x_max, y_min, y_max) belong to the segmenters' shared interface,
        for the box-driven GrabCut segmenter; CLIPSeg looks at the whole image and ignores them.
        """
        import torch
        import torch.nn.functional as F
        from PIL import Image

        check_images(images, labels=labels, boxes=boxes)
        check_labels(labels)
        maps: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            prompts = [label.strip().lower() for label in labels[start:start + self.batch_size]]
            inputs = self.processor(text=prompts, images=[Image.fromarray(image) for image in batch],
                                    padding=True, return_tensors="pt")
            inputs = {key: value.to(self.device) for key, value in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with torch.inference_mode():
                probability = torch.sigmoid(self.network(**inputs).logits.float())
                for image, one in zip(batch, probability):
                    height, width = image.shape[:2]
                    # Sigmoid first, then bilinear: a convex mix of probabilities stays in [0, 1].
                    upsampled = F.interpolate(one[None, None], size=(height, width), mode="bilinear",
                                              align_corners=False)
                    maps.append(upsampled[0, 0].cpu().numpy())
        return maps
