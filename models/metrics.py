"""DreamBench's metrics, as the DreamBooth and BLIP-Diffusion papers define them.

- **DINO**: the CLS token of DINO ViT-S/16 (``facebook/dino-vits16``), read from transformers' ``ViTModel``
  *without* its pooler (a dense layer and tanh that DINO never had), after the ViT's final LayerNorm;
  images Resize(256, bicubic) on the shorter side, CenterCrop(224), ImageNet mean and std, as DINO's own
  evaluation transform. Published numbers differ partly because implementations take the pooler output
  or squash to 224.
- **CLIP-I**: the cosine between CLIP ViT-B/32's (``openai/clip-vit-base-patch32``) projected image
  embeddings of a generated and a real image, with CLIP's own preprocessing (the model folder's image
  processor).
- **CLIP-T**: the cosine between the projected embeddings of a generated image and of its prompt text.

Each embedder loads its model once and runs batched; scores are cosines of L2-normalised embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from blipdiff.models import DEFAULT_CLIP, DEFAULT_DINO

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_shorter(image: Image.Image, side: int) -> Image.Image:
    """torchvision's Resize(side) with bicubic: the shorter side becomes ``side``, the longer one
    ``int(side * long / short)`` (truncated, as torchvision does)."""
    width, height = image.size
    if width <= height:
        size = (side, int(side * height / width))
    else:
        size = (int(side * width / height), side)
    return image.resize(size, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, side: int) -> Image.Image:
    """torchvision's CenterCrop: offsets rounded to the nearest pixel."""
    left, top = int(round((image.width - side) / 2.0)), int(round((image.height - side) / 2.0))
    return image.crop((left, top, left + side, top + side))


def dino_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """[N, 3, 224, 224]: Resize(256, bicubic) → CenterCrop(224) → [0, 1] → ImageNet mean and std."""
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    arrays = [(np.asarray(center_crop(resize_shorter(image.convert("RGB"), 256), 224), np.float32) / 255.0 - mean)
              / std for image in images]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def _normalised(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.float(), dim=-1).cpu()


def _projected(features) -> torch.Tensor:
    """transformers 5's ``get_*_features`` return an output whose pooler_output is the projection;
    4.x returned the tensor itself (the project supports both)."""
    return getattr(features, "pooler_output", features)


class DinoEmbedder:
    """DINO CLS embeddings, L2-normalised."""

    def __init__(self, model: str = DEFAULT_DINO, device: str | torch.device = "cpu", batch_size: int = 64):
        from transformers import ViTModel

        self.model = ViTModel.from_pretrained(model, add_pooling_layer=False).to(device).eval()
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = dino_pixels(images[start:start + self.batch_size]).to(self.device, self.model.dtype)
            chunks.append(_normalised(self.model(pixel_values=pixels).last_hidden_state[:, 0]))
        return torch.cat(chunks)


class ClipEmbedder:
    """CLIP's projected image and text embeddings, L2-normalised."""

    def __init__(self, model: str = DEFAULT_CLIP, device: str | torch.device = "cpu", batch_size: int = 64):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(model).to(device).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt").pixel_values
            features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
            chunks.append(_normalised(_projected(features)))
        return torch.cat(chunks)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                    return_tensors="pt").to(self.device)
            features = self.model.get_text_features(**tokens)
            chunks.append(_normalised(_projected(features)))
        return torch.cat(chunks)


def mean_similarity(generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[N]: each generated embedding's cosine with every real one, averaged over the reals."""
    return (generated @ real.T).mean(dim=1)


def oracle_similarity(real: torch.Tensor) -> float:
    """The mean cosine over every ordered pair of different real photos of one subject (self-pairs
    excluded): the ceiling a subject's generations are read against."""
    count = real.shape[0]
    if count < 2:
        raise ValueError("the oracle needs at least two real photos of a subject")
    similarity = real @ real.T
    return float((similarity.sum() - similarity.diagonal().sum()) / (count * (count - 1)))


def text_similarity(generated: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """[N]: each generated image's cosine with its own prompt's embedding (row i with row i)."""
    return (generated * texts).sum(dim=1)
