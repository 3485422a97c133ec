"""Captioning stage of subject extraction: a caption for each subject photo.

Two captioners share one interface (``caption(images, labels) -> list[Captions]``):

- ``TemplateCaptioner`` needs no weights: "a photo of a {label}". It lets the pipeline run, and be
  tested, on machines without a GPU or the BLIP-2 checkpoint.
- ``Blip2Captioner`` runs BLIP-2 OPT through transformers. By default it writes one caption per image
  by greedy decoding. With ``num_captions > 1`` it follows the BLIP-Diffusion authors instead: it
  samples that many captions with nucleus sampling, ranks them by CLIP image-text similarity when a
  CLIP model is given, and keeps up to ``keep`` of them that name the subject's class.

torch and transformers are imported inside the classes that need them, so the command line can import
this module (and the template captioner) cheaply. The input helpers here are shared with
``blipdiff.models.clipseg``; the device and dtype follow ``blipdiff.models.devices``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from blipdiff.models import DEFAULT_BLIP2
from blipdiff.models.devices import resolve_device, torch_dtype

if TYPE_CHECKING:
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

DEFAULT_TEMPLATE = "a photo of a {label}"


@dataclass(frozen=True)
class Captions:
    """The captions kept for one image: ``caption`` is the chosen one and ``kept`` starts with it."""

    caption: str
    kept: list[str]


class Captioner(Protocol):
    """What the pipeline needs from a captioner."""

    def caption(self, images: Sequence[np.ndarray], labels: Sequence[str]) -> list[Captions]:
        """One ``Captions`` per image; ``labels`` are the subjects' class names, one per image."""
        ...


def check_images(images: Sequence[np.ndarray], **per_image: Sequence[Any]) -> None:
    """Raise ValueError unless every image is a non-empty HxWx3 uint8 RGB array and each list in
    ``per_image`` (labels, boxes, ...) has one entry per image."""
    for name, values in per_image.items():
        if len(values) != len(images):
            raise ValueError(f"{len(images)} images but {len(values)} {name}: they pair one to one")
    for index, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            described = (f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray)
                         else type(image).__name__)
            raise ValueError(f"image {index}: expected an HxWx3 uint8 RGB array, got a {described}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"image {index} is empty: shape {image.shape}")


def check_labels(labels: Sequence[str]) -> None:
    """Raise ValueError unless every label is a string with at least one word in it."""
    for index, label in enumerate(labels):
        if not isinstance(label, str) or not re.search(r"\w", label):
            raise ValueError(f"label {index} is not a class name: {label!r}")


def label_words(label: str) -> list[str]:
    """The lower-cased words of a class name: "Coffee cup" gives ["coffee", "cup"]."""
    return re.findall(r"\w+", label.lower())


def select_captions(ranked: Sequence[str], label: str, keep: int) -> Captions:
    """The authors' filter: keep up to ``keep`` of the ``ranked`` captions (best first) that contain a
    word of the class label (case-insensitive, whole words), or the top caption alone when none does.

    Repeated captions count once: nucleus sampling often draws the same short caption several times,
    and keeping copies would only crowd out different ones.
    """
    if not ranked:
        raise ValueError("no captions to choose from")
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    words = label_words(label)
    if not words:
        raise ValueError(f"the label has no word to look for: {label!r}")
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
    unique = list(dict.fromkeys(ranked))
    naming = [text for text in unique if pattern.search(text)][:keep]
    kept = naming or [unique[0]]
    return Captions(caption=kept[0], kept=kept)


class TemplateCaptioner:
    """Weight-free captions from a template: "a photo of a coffee cup" for the label "Coffee cup"."""

    def __init__(self, template: str = DEFAULT_TEMPLATE) -> None:
        if "{label}" not in template:
            raise ValueError(f"the template must contain {{label}}: {template!r}")
        try:
            template.format(label="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"the template may hold no field but {{label}}: {template!r}") from error
        self.template = template

    def caption(self, images: Sequence[np.ndarray], labels: Sequence[str]) -> list[Captions]:
        """The template filled with each lower-cased label; the images are only checked."""
        check_images(images, labels=labels)
        check_labels(labels)
        texts = [self.template.format(label=label.strip().lower()) for label in labels]
        return [Captions(caption=text, kept=[text]) for text in texts]


@dataclass(frozen=True)
class Blip2Options:
    """How ``Blip2Captioner`` decodes; see its docstring for each option."""

    batch_size: int = 8
    max_new_tokens: int = 30
    prompt: str | None = None
    num_beams: int = 1
    num_captions: int = 1
    top_p: float = 0.95
    min_length: int = 5
    keep: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "num_beams", "num_captions", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.min_length < 0:
            raise ValueError(f"min_length must not be negative, got {self.min_length}")
        if self.sampling and self.min_length > self.max_new_tokens:
            raise ValueError(f"min_length {self.min_length} exceeds max_new_tokens {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    @property
    def sampling(self) -> bool:
        return self.num_captions > 1


class ClipRanker:
    """Ranks each image's candidate captions by CLIP image-text similarity, best first."""

    def __init__(self, model: str, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None) -> None:
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(resolve_device(device))
        self.dtype = torch_dtype(dtype, self.device)
        self.network = CLIPModel.from_pretrained(model, dtype=self.dtype).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(model)

    def rank(self, images: Sequence[np.ndarray], candidates: Sequence[Sequence[str]]) -> list[list[str]]:
        """Each image's candidates sorted by similarity to it; ties keep their order."""
        import torch
        from PIL import Image

        if len(candidates) != len(images):
            raise ValueError(f"{len(images)} images but {len(candidates)} candidate lists")
        if not images:
            return []
        texts = [text for group in candidates for text in group]
        inputs = self.processor(text=texts, images=[Image.fromarray(image) for image in images],
                                padding=True, truncation=True, return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            similarity = self.network(**inputs).logits_per_image.float().cpu()
        ranked, start = [], 0
        for row, group in enumerate(candidates):
            scores = similarity[row, start:start + len(group)]
            order = torch.sort(scores, descending=True, stable=True).indices.tolist()
            ranked.append([group[index] for index in order])
            start += len(group)
        return ranked


def _check_ranking(options: Blip2Options, ranking: bool) -> None:
    if ranking and not options.sampling:
        raise ValueError("CLIP ranking orders sampled captions: it needs num_captions > 1")


class Blip2Captioner:
    """BLIP-2 OPT captions through transformers.

    ``model`` is a hub id or a local folder holding a BLIP-2 checkpoint and its processor (as written by
    ``save_pretrained``). Options:

    - ``device``: default CUDA when available, else the CPU; ``dtype``: "float16", "bfloat16" or
      "float32", default float16 on CUDA and float32 on the CPU.
    - ``batch_size``: images per ``generate`` call; ``max_new_tokens``: caption length cap (30).
    - ``prompt``: optional text the captions continue; it is part of the returned captions.
    - ``num_beams``: the default mode's decoding, 1 (greedy, the default) or a beam width.
    - ``num_captions``: 1 (default) writes one deterministic caption per image. More switches to the
      authors' variant: that many captions per image by nucleus sampling (``top_p``, pure nucleus: no
      top-k cut) with at least ``min_length`` new tokens, ranked by the CLIP model ``clip_model`` (hub id
      or folder) when given and otherwise kept in sampling order, then filtered by
      ``select_captions`` to at most ``keep`` captions that name the class.
    - ``seed``: seeds sampling at the start of every ``caption``/``candidates`` call, so the same
      images with the same options give the same captions. The global RNG state is left as it was.
    """

    def __init__(
        self,
        model: str = DEFAULT_BLIP2,
        *,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 30,
        prompt: str | None = None,
        num_beams: int = 1,
        num_captions: int = 1,
        top_p: float = 0.95,
        min_length: int = 5,
        keep: int = 5,
        clip_model: str | None = None,
        seed: int = 0,
    ) -> None:
        import torch
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        # Options first: a bad one should fail before a multi-gigabyte load, not after.
        options = Blip2Options(batch_size=batch_size, max_new_tokens=max_new_tokens, prompt=prompt,
                               num_beams=num_beams, num_captions=num_captions, top_p=top_p,
                               min_length=min_length, keep=keep, seed=seed)
        _check_ranking(options, ranking=clip_model is not None)
        resolved_device = torch.device(resolve_device(device))
        resolved_dtype = torch_dtype(dtype, resolved_device)
        network = Blip2ForConditionalGeneration.from_pretrained(model, dtype=resolved_dtype)
        processor = Blip2Processor.from_pretrained(model)
        ranker = None
        if clip_model is not None:
            ranker = ClipRanker(clip_model, device=resolved_device, dtype=resolved_dtype)
        self._bind(network.to(resolved_device), processor, ranker, options, source=model)

    @classmethod
    def from_modules(cls, network: Blip2ForConditionalGeneration, processor: Blip2Processor, *,
                     ranker: ClipRanker | None = None, **options: Any) -> Blip2Captioner:
        """Wrap a BLIP-2 model and processor already in memory, on the model's device and in its dtype.
        The GPU benchmark builds the real architecture with random weights this way, straight on the
        GPU, instead of writing and reading 15 GB of random weights."""
        captioner = cls.__new__(cls)
        captioner._bind(network, processor, ranker, Blip2Options(**options), source=type(network).__name__)
        return captioner

    def _bind(self, network: Blip2ForConditionalGeneration, processor: Blip2Processor,
              ranker: ClipRanker | None, options: Blip2Options, source: str) -> None:
        _check_ranking(options, ranking=ranker is not None)
        config = network.config
        # Checkpoints saved before transformers 4.47 lack these; without them the image features
        # would silently never reach the language model.
        if config.image_token_index is None or processor.num_query_tokens != config.num_query_tokens:
            raise ValueError(
                f"{source}: the processor's query tokens ({processor.num_query_tokens}) and the model's "
                f"({config.num_query_tokens}, image token {config.image_token_index}) disagree; re-save the "
                "checkpoint with a current transformers"
            )
        self.network = network.eval()
        self.processor = processor
        self.ranker = ranker
        self.options = options
        self.device = network.device
        # The pixels' dtype is the vision tower's: under float16 the Q-Former stays in float32.
        self.dtype = network.vision_model.dtype

    def candidates(self, images: Sequence[np.ndarray]) -> list[list[str]]:
        """Every caption generated for each image, in generation order: one per image by default,
        ``num_captions`` when sampling."""
        import torch

        check_images(images)
        options = self.options
        per_image = options.num_captions
        if options.sampling:
            decoding = {"do_sample": True, "top_p": options.top_p, "top_k": 0,
                        "min_new_tokens": options.min_length, "num_return_sequences": per_image}
        else:
            # One new token at least: an immediate end of sequence would leave an empty caption.
            decoding = {"do_sample": False, "num_beams": options.num_beams, "min_new_tokens": 1}
        cuda = []
        if self.device.type == "cuda":
            cuda = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        found: list[list[str]] = []
        with torch.random.fork_rng(devices=cuda), torch.inference_mode():
            torch.manual_seed(options.seed)
            for start in range(0, len(images), options.batch_size):
                batch = images[start:start + options.batch_size]
                inputs = self._inputs(batch)
                generated = self.network.generate(**inputs, max_new_tokens=options.max_new_tokens, **decoding)
                texts = [text.strip() for text in self.processor.batch_decode(generated, skip_special_tokens=True)]
                found.extend(texts[index:index + per_image] for index in range(0, len(texts), per_image))
        return found

    def caption(self, images: Sequence[np.ndarray], labels: Sequence[str]) -> list[Captions]:
        """The chosen captions for each image: the generated one by default; in the authors' variant
        the ranked, class-filtered ones (``select_captions``)."""
        check_images(images, labels=labels)
        check_labels(labels)
        found = self.candidates(images)
        if self.ranker is not None:
            found = self.ranker.rank(images, found)
        return [select_captions(group, label, self.options.keep) for group, label in zip(found, labels)]

    def _inputs(self, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        from PIL import Image

        # The processor puts the image query tokens and BOS before the prompt; an empty prompt
        # leaves exactly those, as the model's own default start does.
        prompt = self.options.prompt or ""
        inputs = self.processor(images=[Image.fromarray(image) for image in images], text=[prompt] * len(images),
                                return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs


def make_captioner(name: str, **options: Any) -> Captioner:
    """The captioner called ``name`` ("template" or "blip2"), built with ``options``."""
    if name == "template":
        return TemplateCaptioner(**options)
    if name == "blip2":
        return Blip2Captioner(**options)
    raise ValueError(f"unknown captioner {name!r}: expected 'template' or 'blip2'")
