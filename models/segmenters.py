"""Subject segmenters: a probability map per image, at the image's own resolution.

`clipseg` is CLIPSeg prompted with the class name (models/clipseg.py); `grabcut` is weight-free:
OpenCV's GrabCut started from the subject's box.
"""

from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np

from blipdiff.datasets.matting import box_in_pixels

Box = tuple[float, float, float, float]


class Segmenter(Protocol):
    def probabilities(self, images: list[np.ndarray], labels: list[str], boxes: list[Box]) -> list[np.ndarray]:
        """Per image (uint8 HxWx3 RGB), a float32 HxW map of the subject's probability in [0, 1]."""
        ...


class GrabCutSegmenter:
    """GrabCut from the box, at a working resolution; the map is its final labelling.

    Pixels GrabCut calls foreground (sure or probable) score 1, the rest 0, and the map is smoothed
    over a few pixels so that the trimap's thresholds see the edge's uncertainty.
    """

    def __init__(self, iterations: int = 5, working_long_side: int = 512, edge_blur: float = 0.005, ring: float = 0.05,
                 seed: int = 0):
        if iterations < 1:
            raise ValueError("GrabCut needs at least one iteration")
        self.iterations = iterations
        self.working_long_side = working_long_side
        self.edge_blur = edge_blur
        self.ring = ring
        self.seed = seed

    def probabilities(self, images: list[np.ndarray], labels: list[str], boxes: list[Box]) -> list[np.ndarray]:
        if not len(images) == len(labels) == len(boxes):
            raise ValueError(f"{len(images)} images, {len(labels)} labels and {len(boxes)} boxes")
        return [self._one(image, box) for image, box in zip(images, boxes, strict=True)]

    def _one(self, image: np.ndarray, box: Box) -> np.ndarray:
        height, width = image.shape[:2]
        scale = min(1.0, self.working_long_side / max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        work = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale < 1 else image
        x0, y0, x1, y1 = box_in_pixels(box, size[0], size[1])
        if x1 - x0 < 2 or y1 - y0 < 2:
            return np.zeros((height, width), dtype=np.float32)
        # Outside the box is background; inside, probably foreground. A box edge on the image border
        # stays foreground there (a rectangle would force the border row to background), and a box
        # covering the whole image leaves a one-pixel frame as probable background to learn from.
        mask = np.full((size[1], size[0]), cv2.GC_BGD, dtype=np.uint8)
        mask[y0:y1, x0:x1] = cv2.GC_PR_FGD
        if self.ring > 0:
            ry, rx = max(1, int(self.ring * (y1 - y0))), max(1, int(self.ring * (x1 - x0)))
            inner = mask[y0 + ry : y1 - ry, x0 + rx : x1 - rx].copy()
            mask[y0:y1, x0:x1] = cv2.GC_PR_BGD
            mask[y0 + ry : y1 - ry, x0 + rx : x1 - rx] = inner
        if not (mask == cv2.GC_BGD).any():
            mask[[0, -1], :] = cv2.GC_PR_BGD
            mask[:, [0, -1]] = cv2.GC_PR_BGD
        background_model = np.zeros((1, 65), dtype=np.float64)
        foreground_model = np.zeros((1, 65), dtype=np.float64)
        # GrabCut's k-means draws from OpenCV's per-thread generator: seed it for every image, so a
        # result never depends on which images the same worker segmented before.
        cv2.setRNGSeed(self.seed)
        cv2.grabCut(
            np.ascontiguousarray(work[..., ::-1]), mask, None, background_model, foreground_model,
            self.iterations, cv2.GC_INIT_WITH_MASK,
        )
        labelled = np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.float32)
        sigma = self.edge_blur * max(size)
        if sigma > 0:
            labelled = cv2.GaussianBlur(labelled, (0, 0), sigma)
        if scale < 1:
            labelled = cv2.resize(labelled, (width, height), interpolation=cv2.INTER_LINEAR)
        return np.clip(labelled, 0.0, 1.0)


def make_segmenter(name: str, **options) -> Segmenter:
    """`grabcut` (weight-free) or `clipseg` (CLIPSeg; options go to its constructor)."""
    if name == "grabcut":
        return GrabCutSegmenter(**options)
    if name == "clipseg":
        from blipdiff.models.clipseg import ClipSegSegmenter

        return ClipSegSegmenter(**options)
    raise ValueError(f"unknown segmenter {name!r}: choose grabcut or clipseg")
