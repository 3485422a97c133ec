"""CLIPSeg segmenter: a tiny random CLIPSeg, saved and loaded from a folder like real weights."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
from helpers import shared_path
from PIL import Image
from tiny_models import save_tiny_clipseg

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from blipdiff.models.clipseg import ClipSegSegmenter  # noqa: E402

SUBJECTS = [("dog", "Dog"), ("cat", "Cat"), ("backpack", "Backpack"), ("bear_plushie", "Teddy bear"),
            ("clock", "Clock")]


def dreambench_images(count: int) -> list[np.ndarray]:
    """The first photo of ``count`` DreamBench subjects, cropped and shrunk to a different size and
    aspect each (the photos are square), so every output must follow its own image's shape."""
    root = shared_path("dreambench", "dataset")
    return list(_photos(root)[:count])


@cache
def _photos(root: Path) -> tuple[np.ndarray, ...]:
    images = []
    for index, (subject, _) in enumerate(SUBJECTS):
        with Image.open(root / subject / "00.jpg") as photo:
            photo.draft("RGB", (300, 300))
            width, height = photo.size
            photo = photo.convert("RGB").crop((0, 0, width, height * (10 - index) // 10))
            photo.thumbnail((150 - 10 * index, 150))
            images.append(np.asarray(photo))
    return tuple(images)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clipseg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random CLIPSeg with the real decoder layout (complex transposed convolution, patch 16), 64x64 input."""
    return save_tiny_clipseg(tmp_path_factory.mktemp("clipseg"))


@pytest.fixture(scope="module")
def segmenter(clipseg_folder: Path) -> ClipSegSegmenter:
    return ClipSegSegmenter(model=str(clipseg_folder), device="cpu", batch_size=2)


def test_maps_have_each_images_size_and_lie_in_unit_interval(segmenter: ClipSegSegmenter) -> None:
    images = dreambench_images(5)
    labels = [label for _, label in SUBJECTS]
    maps = segmenter.probabilities(images, labels, [(0.1, 0.9, 0.1, 0.9)] * 5)
    assert len(maps) == 5
    assert len({image.shape for image in images}) == 5
    for image, probability in zip(images, maps):
        assert isinstance(probability, np.ndarray)
        assert probability.dtype == np.float32
        assert probability.shape == image.shape[:2]
        assert np.isfinite(probability).all()
        assert probability.min() >= 0.0 and probability.max() <= 1.0
        # A real map, not a constant: the random decoder still responds to the pixels.
        assert probability.std() > 0.0


def test_map_is_the_upsampled_sigmoid_of_the_logits_for_the_lower_cased_label(
        segmenter: ClipSegSegmenter, clipseg_folder: Path) -> None:
    image = dreambench_images(1)[0]
    processor = transformers.CLIPSegProcessor.from_pretrained(clipseg_folder)
    inputs = processor(text=["coffee cup"], images=[Image.fromarray(image)], padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = segmenter.network(**inputs).logits
    assert logits.shape == (1, 64, 64)
    expected = torch.nn.functional.interpolate(torch.sigmoid(logits)[None], size=image.shape[:2],
                                               mode="bilinear", align_corners=False)[0, 0].numpy()
    (probability,) = segmenter.probabilities([image], ["Coffee Cup"], [(0.0, 1.0, 0.0, 1.0)])
    np.testing.assert_allclose(probability, expected, atol=1e-6)
    (other,) = segmenter.probabilities([image], ["dog"], [(0.0, 1.0, 0.0, 1.0)])
    assert not np.allclose(probability, other), "the prompt must change the map"


def test_batching_matches_one_by_one(segmenter: ClipSegSegmenter) -> None:
    images = dreambench_images(5)
    labels = [label for _, label in SUBJECTS]
    boxes = [(0.0, 1.0, 0.0, 1.0)] * 5
    batched = ClipSegSegmenter.from_modules(segmenter.network, segmenter.processor, batch_size=4).probabilities(
        images, labels, boxes)
    single = ClipSegSegmenter.from_modules(segmenter.network, segmenter.processor, batch_size=1)
    for index, image in enumerate(images):
        (alone,) = single.probabilities([image], [labels[index]], [boxes[index]])
        np.testing.assert_allclose(batched[index], alone, atol=1e-4)


def test_boxes_do_not_change_the_map(segmenter: ClipSegSegmenter) -> None:
    images = dreambench_images(2)
    whole = segmenter.probabilities(images, ["Dog", "Cat"], [(0.0, 1.0, 0.0, 1.0)] * 2)
    boxed = segmenter.probabilities(images, ["Dog", "Cat"], [(0.2, 0.4, 0.3, 0.5)] * 2)
    for a, b in zip(whole, boxed):
        np.testing.assert_array_equal(a, b)


def test_empty_batch(segmenter: ClipSegSegmenter) -> None:
    assert segmenter.probabilities([], [], []) == []


def test_bad_input_is_refused(segmenter: ClipSegSegmenter) -> None:
    image = np.zeros((40, 50, 3), dtype=np.uint8)
    box = (0.0, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        segmenter.probabilities([image, image], ["Dog"], [box, box])
    with pytest.raises(ValueError, match="1 images but 2 boxes"):
        segmenter.probabilities([image], ["Dog"], [box, box])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        segmenter.probabilities([image.astype(np.float32)], ["Dog"], [box])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        segmenter.probabilities([image[..., 0]], ["Dog"], [box])
    with pytest.raises(ValueError, match="not a class name"):
        segmenter.probabilities([image], ["  "], [box])
    with pytest.raises(ValueError, match="batch_size"):
        ClipSegSegmenter.from_modules(segmenter.network, segmenter.processor, batch_size=0)
    with pytest.raises(ValueError, match="unknown dtype"):
        ClipSegSegmenter(model="unused", device="cpu", dtype="float8")
