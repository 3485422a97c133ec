"""Captioners: the template one, and BLIP-2 (plus the CLIP ranking) as tiny random models saved to and
loaded from folders exactly like real weights."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_clipseg import dreambench_images
from tiny_models import NUM_QUERY_TOKENS, save_tiny_blip2, save_tiny_clip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from blipdiff.models.captioners import (  # noqa: E402
    Blip2Captioner,
    Captions,
    ClipRanker,
    TemplateCaptioner,
    make_captioner,
    select_captions,
)

LABELS = ["Dog", "Cat", "Backpack", "Teddy bear", "Clock"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def blip2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random BLIP-2 OPT: 32x32 images, 4 query tokens, hidden sizes 32, two layers everywhere."""
    return save_tiny_blip2(tmp_path_factory.mktemp("blip2"))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random CLIP for the ranking: 32x32 images, hidden sizes 32, two layers."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def greedy(blip2_folder: Path) -> Blip2Captioner:
    return Blip2Captioner(model=str(blip2_folder), device="cpu", batch_size=2, max_new_tokens=8)


@pytest.fixture(scope="module")
def sampler(blip2_folder: Path) -> Blip2Captioner:
    return Blip2Captioner(model=str(blip2_folder), device="cpu", batch_size=2, max_new_tokens=8, num_captions=6,
                          min_length=3, keep=3, seed=7)


def names(text: str, label: str) -> bool:
    """Whether ``text`` contains a word of ``label`` as a whole word, ignoring case."""
    return any(re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) for word in re.findall(r"\w+", label))


# Template captioner and the factory.


def test_template_captions_are_exact() -> None:
    images = [np.zeros((8, 8, 3), dtype=np.uint8)] * 2
    assert TemplateCaptioner().caption(images, ["Coffee cup", "Dog"]) == [
        Captions(caption="a photo of a coffee cup", kept=["a photo of a coffee cup"]),
        Captions(caption="a photo of a dog", kept=["a photo of a dog"]),
    ]
    (only,) = TemplateCaptioner("a {label}, studio light").caption(images[:1], ["Teddy Bear"])
    assert only.caption == "a teddy bear, studio light"
    with pytest.raises(ValueError, match="must contain"):
        TemplateCaptioner("a photo of a thing")
    with pytest.raises(ValueError, match="no field but"):
        TemplateCaptioner("a {style} photo of a {label}")
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        TemplateCaptioner().caption(images, ["Dog"])


def test_make_captioner(blip2_folder: Path) -> None:
    template = make_captioner("template", template="an image of a {label}")
    assert isinstance(template, TemplateCaptioner)
    assert template.caption([np.zeros((4, 4, 3), dtype=np.uint8)], ["Cat"])[0].caption == "an image of a cat"
    blip2 = make_captioner("blip2", model=str(blip2_folder), device="cpu", max_new_tokens=4)
    assert isinstance(blip2, Blip2Captioner)
    for name in ("blip", "BLIP2", "", "clipseg"):
        with pytest.raises(ValueError, match="unknown captioner"):
            make_captioner(name)


def test_modules_import_without_torch() -> None:
    code = "import sys, blipdiff.models.captioners, blipdiff.models.clipseg; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# The authors' filter on controlled candidates.


def test_select_keeps_ranked_captions_naming_the_class() -> None:
    ranked = ["a red mug on a table", "a coffee cup on a desk", "cups of tea", "a Cup of coffee",
              "a coffee cup on a desk", "coffee-cup art", "espresso"]
    chosen = select_captions(ranked, "Coffee cup", keep=3)
    # Whole words only ("cups" is not "cup"), case-insensitive, best first, each caption once.
    assert chosen == Captions(caption="a coffee cup on a desk",
                              kept=["a coffee cup on a desk", "a Cup of coffee", "coffee-cup art"])
    assert select_captions(ranked, "Coffee cup", keep=1).kept == ["a coffee cup on a desk"]


def test_select_falls_back_to_the_top_caption() -> None:
    chosen = select_captions(["a red mug on a table", "a dogged effort", "cups of tea"], "Dog", keep=5)
    assert chosen == Captions(caption="a red mug on a table", kept=["a red mug on a table"])
    with pytest.raises(ValueError, match="no captions"):
        select_captions([], "Dog", keep=5)
    with pytest.raises(ValueError, match="keep"):
        select_captions(["a dog"], "Dog", keep=0)
    with pytest.raises(ValueError, match="no word"):
        select_captions(["a dog"], " - ", keep=1)


# BLIP-2, default mode: one greedy caption per image.


def test_greedy_captions_one_per_image(greedy: Blip2Captioner) -> None:
    images = dreambench_images(5)
    result = greedy.caption(images, LABELS)
    assert len(result) == 5
    for captions in result:
        assert isinstance(captions, Captions)
        assert isinstance(captions.caption, str) and captions.caption
        assert captions.kept == [captions.caption]
    assert [[c.caption] for c in result] == greedy.candidates(images)
    # Different images give different captions: the image tokens do reach the language model.
    assert len({c.caption for c in result}) > 1
    assert greedy.caption(images, LABELS) == result


def test_greedy_batching_matches_one_by_one(blip2_folder: Path, greedy: Blip2Captioner) -> None:
    images = dreambench_images(5)
    batched = Blip2Captioner(model=str(blip2_folder), device="cpu", batch_size=4, max_new_tokens=8)
    alone = [greedy.caption([image], [label])[0] for image, label in zip(images, LABELS)]
    assert batched.caption(images, LABELS) == alone


def test_prompt_starts_every_caption(blip2_folder: Path) -> None:
    prompted = Blip2Captioner(model=str(blip2_folder), device="cpu", max_new_tokens=6, prompt="a photo of")
    for captions in prompted.caption(dreambench_images(3), LABELS[:3]):
        assert captions.caption.startswith("a photo of")
        assert len(captions.caption) > len("a photo of")


def test_empty_batch(greedy: Blip2Captioner) -> None:
    assert greedy.caption([], []) == []


# BLIP-2, the authors' variant: sampled, optionally CLIP-ranked, filtered by the class name.


def test_sampling_is_seeded_and_reproducible(blip2_folder: Path, sampler: Blip2Captioner) -> None:
    images = dreambench_images(3)
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    first = sampler.candidates(images)
    assert torch.equal(torch.rand(4), expected_next), "sampling must leave the global RNG as it was"
    assert [len(group) for group in first] == [6, 6, 6]
    assert len(set(first[0])) > 1, "nucleus sampling should vary the captions"
    assert sampler.candidates(images) == first
    again = Blip2Captioner(model=str(blip2_folder), device="cpu", batch_size=2, max_new_tokens=8, num_captions=6,
                           min_length=3, keep=3, seed=7)
    assert again.candidates(images) == first
    other = Blip2Captioner.from_modules(sampler.network, sampler.processor, batch_size=2, max_new_tokens=8,
                                        num_captions=6, min_length=3, keep=3, seed=8)
    assert other.candidates(images) != first


def test_sampling_passes_the_variants_settings_to_generate(
        sampler: Blip2Captioner, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    generate = sampler.network.generate

    def spy(**kwargs):
        output = generate(**kwargs)
        calls.append((kwargs, output))
        return output

    monkeypatch.setattr(sampler.network, "generate", spy)
    sampler.candidates(dreambench_images(3))
    assert len(calls) == 2, "3 images in batches of 2"
    kwargs, output = calls[0]
    assert {key: kwargs[key] for key in ("do_sample", "top_p", "top_k", "min_new_tokens", "num_return_sequences",
                                         "max_new_tokens")} == {
        "do_sample": True, "top_p": 0.95, "top_k": 0, "min_new_tokens": 3, "num_return_sequences": 6,
        "max_new_tokens": 8}
    assert output.shape[0] == 2 * 6
    new = output[:, kwargs["input_ids"].shape[1]:]
    assert not (new[:, :3] == sampler.network.config.text_config.eos_token_id).any(), "min_length new tokens"


def test_greedy_passes_deterministic_settings_to_generate(
        greedy: Blip2Captioner, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    generate = greedy.network.generate
    monkeypatch.setattr(greedy.network, "generate", lambda **kwargs: calls.append(kwargs) or generate(**kwargs))
    greedy.candidates(dreambench_images(1))
    (kwargs,) = calls
    assert kwargs["do_sample"] is False and kwargs["num_beams"] == 1 and kwargs["max_new_tokens"] == 8
    assert kwargs["input_ids"][0, :NUM_QUERY_TOKENS].tolist() == [greedy.network.config.image_token_index] * 4


def test_variant_on_controlled_generations(sampler: Blip2Captioner, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed token sequences in place of sampling: decoding, splitting per image and the filter."""
    written = [
        ["a red mug", "a coffee cup on a desk", "a cup of coffee", "cups", "a coffee cup on a desk", "a table"],
        ["a dog on the grass", "a cat", "grass", "a window", "a sofa", "a dog sitting in the park"],
    ]
    tokenizer = sampler.processor.tokenizer
    pad = tokenizer.pad_token_id
    # The generations of the images in the three calls below, in order.
    queue = [*written, *written, written[1]]

    def generate(**kwargs):
        prompt = kwargs["input_ids"].repeat_interleave(kwargs["num_return_sequences"], dim=0)
        groups = [queue.pop(0) for _ in range(len(kwargs["input_ids"]))]
        rows = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                for texts in groups for text in texts]
        width = max(map(len, rows))
        tail = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
        return torch.cat([prompt, tail], dim=1)

    monkeypatch.setattr(sampler.network, "generate", generate)
    images = dreambench_images(2)
    assert sampler.candidates(images) == written
    result = sampler.caption(images, ["Coffee cup", "Teddy bear"])
    assert result[0] == Captions(caption="a coffee cup on a desk", kept=["a coffee cup on a desk", "a cup of coffee"])
    assert result[1] == Captions(caption="a dog on the grass", kept=["a dog on the grass"])
    (dog,) = sampler.caption(images[1:], ["Dog"])
    assert dog.kept == ["a dog on the grass", "a dog sitting in the park"]
    assert not queue


def test_variant_keeps_captions_naming_the_class(sampler: Blip2Captioner) -> None:
    images = dreambench_images(3)
    candidates = sampler.candidates(images)
    words = [re.findall(r"\w+", text) for text in candidates[0]]
    word = next(found[0] for found in words if found)
    # Image 0's label is a word from its own captions, in capitals; image 1's is named by none.
    labels = [word.upper(), "Xylophone", LABELS[2]]
    assert not any(names(text, "Xylophone") for text in candidates[1])
    result = sampler.caption(images, labels)

    naming = list(dict.fromkeys(text for text in candidates[0] if names(text, word)))
    assert naming, "the chosen word comes from these captions"
    assert result[0].kept == naming[:3]
    assert result[0].caption == naming[0]
    assert all(names(text, labels[0]) for text in result[0].kept)
    assert result[1] == Captions(caption=candidates[1][0], kept=[candidates[1][0]])
    assert set(result[2].kept) <= set(candidates[2]) and 1 <= len(result[2].kept) <= 3


def test_variant_ranks_by_clip_similarity(blip2_folder: Path, clip_folder: Path, sampler: Blip2Captioner) -> None:
    images = dreambench_images(2)
    ranking = Blip2Captioner(model=str(blip2_folder), device="cpu", batch_size=2, max_new_tokens=8, num_captions=6,
                             min_length=3, keep=3, seed=7, clip_model=str(clip_folder))
    candidates = ranking.candidates(images)
    assert candidates == sampler.candidates(images), "ranking must not change what is sampled"

    clip = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    processor = transformers.CLIPProcessor.from_pretrained(clip_folder)

    def similarity(image: np.ndarray, texts: list[str]) -> list[float]:
        inputs = processor(text=texts, images=[image], padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            out = clip(**inputs)
        return (out.text_embeds @ out.image_embeds[0]).tolist()

    ranked = ranking.ranker.rank(images, candidates)
    for image, group, order in zip(images, candidates, ranked):
        assert sorted(order) == sorted(group)
        scores = similarity(image, order)
        assert all(a >= b - 1e-5 for a, b in zip(scores, scores[1:])), scores
    # No caption names a xylophone: each image keeps its best-ranked caption alone.
    for captions, order in zip(ranking.caption(images, ["Xylophone"] * 2), ranked):
        assert captions.kept == [order[0]]


def test_clip_ranker_orders_controlled_captions(clip_folder: Path) -> None:
    ranker = ClipRanker(str(clip_folder), device="cpu")
    images = dreambench_images(2)
    captions = [["a dog on the grass", "a red coffee cup", "a camera on a desk"],
                ["a cat sleeping", "a cat sleeping", "a teddy bear plushie", "a clock"]]
    ranked = ranker.rank(images, captions)
    assert [sorted(group) for group in ranked] == [sorted(group) for group in captions]
    with torch.inference_mode():
        inputs = ranker.processor(text=captions[1], images=[images[1]], padding=True, return_tensors="pt")
        logits = ranker.network(**inputs).logits_per_image[0]
    order = torch.sort(logits, descending=True, stable=True).indices.tolist()
    assert ranked[1] == [captions[1][index] for index in order]
    with pytest.raises(ValueError, match="2 images but 1 candidate lists"):
        ranker.rank(images, captions[:1])


# Bad input and bad options.


def test_bad_input_is_refused(greedy: Blip2Captioner) -> None:
    image = np.zeros((40, 50, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        greedy.caption([image, image], ["Dog"])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        greedy.caption([image.astype(np.float32)], ["Dog"])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        greedy.caption([np.zeros((40, 50, 4), dtype=np.uint8)], ["Dog"])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        greedy.caption([image.tolist()], ["Dog"])
    with pytest.raises(ValueError, match="empty"):
        greedy.caption([np.zeros((0, 50, 3), dtype=np.uint8)], ["Dog"])
    with pytest.raises(ValueError, match="not a class name"):
        greedy.caption([image], [""])


@pytest.mark.parametrize(("options", "message"), [
    ({"batch_size": 0}, "batch_size"),
    ({"num_captions": 0}, "num_captions"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"num_captions": 2, "min_length": 40}, "min_length"),
    ({"keep": 0}, "keep"),
    ({"dtype": "int8"}, "unknown dtype"),
    ({"clip_model": "unused"}, "num_captions > 1"),
])
def test_bad_options_fail_before_loading(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Blip2Captioner(model="no/such-model", device="cpu", **options)


def test_processor_and_model_must_agree_on_query_tokens(greedy: Blip2Captioner, blip2_folder: Path) -> None:
    processor = transformers.Blip2Processor.from_pretrained(blip2_folder)
    processor.num_query_tokens = NUM_QUERY_TOKENS + 1
    with pytest.raises(ValueError, match="query tokens"):
        Blip2Captioner.from_modules(greedy.network, processor)
