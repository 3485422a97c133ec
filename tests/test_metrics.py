"""DreamBench's metrics on real DreamBench photos with small random DINO and CLIP models: blipdiff's
DINO, CLIP-I, CLIP-T and oracle agree with a plain computation of the protocol written here, and the two
common departures from it (the ViT pooler, a 224 squash) do not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from helpers import shared_path
from PIL import Image
from tiny_models import save_tiny_clip, save_tiny_dino

from blipdiff.models.metrics import (ClipEmbedder, DinoEmbedder, mean_similarity, oracle_similarity,
                                     text_similarity)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory) -> Path:
    return save_tiny_dino(tmp_path_factory.mktemp("dino"))


@pytest.fixture(scope="module")
def photos() -> dict[str, list[Image.Image]]:
    dataset = shared_path("dreambench", "dataset")
    return {subject: [Image.open(path).convert("RGB") for path in sorted((dataset / subject).glob("*.jpg"))]
            for subject in ("dog", "cat")}


def plain_dino(folder: Path, images: list[Image.Image], pooler: bool = False, squash: bool = False) -> np.ndarray:
    """The protocol spelled out: shorter side to 256 (bicubic; the longer one truncated), the centre
    224 square, /255, ImageNet mean and std, the ViT's CLS token after its final LayerNorm."""
    model = transformers.ViTModel.from_pretrained(folder).eval()
    rows = []
    for image in images:
        if squash:
            image = image.resize((224, 224), Image.Resampling.BICUBIC)
        else:
            width, height = image.size
            short = min(width, height)
            image = image.resize((256 * width // short if width > height else 256,
                                  256 * height // short if height > width else 256), Image.Resampling.BICUBIC)
            left, top = round((image.width - 224) / 2), round((image.height - 224) / 2)
            image = image.crop((left, top, left + 224, top + 224))
        pixels = (np.asarray(image, np.float64) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        with torch.no_grad():
            output = model(pixel_values=torch.tensor(pixels.transpose(2, 0, 1)[None], dtype=torch.float32))
        vector = (output.pooler_output if pooler else output.last_hidden_state[:, 0])[0].numpy().astype(np.float64)
        rows.append(vector / np.linalg.norm(vector))
    return np.stack(rows)


def plain_pair_means(generated: np.ndarray, real: np.ndarray) -> np.ndarray:
    return np.array([np.mean([float(g @ r) for r in real]) for g in generated])


def test_dino_follows_the_protocol_and_the_departures_do_not(dino_folder, photos):
    generated, real = photos["cat"], photos["dog"]
    ours = mean_similarity(DinoEmbedder(str(dino_folder), batch_size=2)(generated), DinoEmbedder(str(dino_folder))(real))
    expected = plain_pair_means(plain_dino(dino_folder, generated), plain_dino(dino_folder, real))
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-5)
    for departure in ({"pooler": True}, {"squash": True}):
        wrong = plain_pair_means(plain_dino(dino_folder, generated, **departure),
                                 plain_dino(dino_folder, real, **departure))
        assert np.abs(wrong - expected).max() > 1e-4, departure


def test_the_oracle_averages_every_pair_of_different_photos(dino_folder, photos):
    real = DinoEmbedder(str(dino_folder))(photos["dog"])
    vectors = real.double().numpy()
    pairs = [float(a @ b) for i, a in enumerate(vectors) for j, b in enumerate(vectors) if i != j]
    assert oracle_similarity(real) == pytest.approx(np.mean(pairs), abs=1e-6)
    with pytest.raises(ValueError, match="at least two real photos"):
        oracle_similarity(real[:1])


def test_clip_image_and_text_scores_follow_the_protocol(tmp_path, photos):
    folder = save_tiny_clip(tmp_path / "clip")
    generated, real = photos["cat"][:3], photos["dog"]
    prompts = ["a cat on the grass", "a dog in the park", "a photo of a cat"]
    embedder = ClipEmbedder(str(folder), batch_size=2)
    clip_i = mean_similarity(embedder.images(generated), embedder.images(real))
    clip_t = text_similarity(embedder.images(generated), embedder.texts(prompts))

    model = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = transformers.CLIPProcessor.from_pretrained(folder)

    def unit(vectors: torch.Tensor) -> np.ndarray:
        array = vectors.numpy().astype(np.float64)
        return array / np.linalg.norm(array, axis=1, keepdims=True)

    def image_vectors(images):
        with torch.no_grad():
            vision = model.vision_model(pixel_values=processor(images=images, return_tensors="pt").pixel_values)
            return unit(model.visual_projection(vision.pooler_output))

    with torch.no_grad():
        tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        text = unit(model.text_projection(model.text_model(**tokens).pooler_output))
    np.testing.assert_allclose(clip_i.numpy(), plain_pair_means(image_vectors(generated), image_vectors(real)),
                               atol=1e-5)
    np.testing.assert_allclose(clip_t.numpy(), (image_vectors(generated) * text).sum(axis=1), atol=1e-5)
