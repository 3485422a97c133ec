"""The reference side of the BLIP-Diffusion parity measurement: diffusers' own ``BlipDiffusionPipeline``.

Runs only with the side environment's python (diffusers 0.32.2, transformers 4.44.2), which
bench/reference_parity.py creates; it never imports blipdiff.

    python bench/reference_side.py build --out CHECKPOINT --bert-tokenizer BERT [--format bin|safetensors] \
        [--size tiny|real] [--controlnet]
    python bench/reference_side.py generate --model CHECKPOINT --bert-tokenizer BERT --cases cases.json \
        --images DREAMBENCH_DATASET --out reference.npz

``build`` makes a random BLIP-Diffusion out of the reference classes, perturbs every weight and saves it
in the layout of ``Salesforce/blipdiffusion``: a tiny one (``--size tiny``, the default) or one of the
released checkpoint's real architecture (``--size real``: CLIP ViT-L/14 cut to 23 layers, the BERT-base
Q-Former with 16 queries, CLIP ViT-L's text encoder, Stable Diffusion v1.5's U-Net and VAE; 1.56 billion
parameters, 6.2 GB in float32); ``--controlnet`` adds a random ControlNet made from the U-Net, in the layout
of ``Salesforce/blipdiffusion-controlnet`` (``model_index.json`` lists it). The tokenizers are tiny trained ones; at real size they are padded
with filler entries to the real vocabularies' sizes (49,408 CLIP BPE tokens with <|startoftext|> and
<|endoftext|> at 49406 and 49407; 30,522 WordPiece tokens, so that "[DEC]" is 30522), which the real
embedding matrices need. Like the released checkpoint, ``qformer/config.json`` names no ``tokenizer``:
the reference Q-Former then loads ``bert-base-uncased`` from the Hugging Face cache at construction. Both
commands therefore point ``HF_HOME`` at a private folder in which the WordPiece tokenizer (written by
``build`` to BERT) stands in as the cached ``bert-base-uncased`` snapshot, so the checkpoint loads
offline exactly as the real one does with a warm cache.

``generate`` runs each case of cases.json (see reference_parity.py), a case with a ``control_image``
through diffusers' ``BlipDiffusionControlNetPipeline``, and writes, per case NAME:
``NAME.image`` [H, W, 3] float32 in [0, 1] (``output_type="np"``), ``NAME.subject_embedding`` [1, Q, D]
(the Q-Former on the pipeline's own preprocessing of the reference image), and, to locate a disagreement,
what the pipeline handed on inside: ``NAME.pixel_values`` (the preprocessed reference image),
``NAME.subject_ids``, ``NAME.prompt_ids`` and, when guided, ``NAME.negative_ids`` (token ids),
``NAME.context`` (the U-Net's ``encoder_hidden_states`` at the first step, unconditional rows first) and
``NAME.final_latents`` (the latents the VAE decodes, before division by the scaling factor).
A batch case (see ``is_batch``: N prompts, each with its own reference photo and categories) keeps every
image, ``NAME.image`` [N, H, W, 3], and one subject embedding per reference, [N, Q, D]; its other tensors
have N rows (2N for the guided context) as they do anyway.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PERTURBATION_SEED = 20240611
BPE_MERGES = 200  # a cap: the corpus is fully merged after 165

# The tiny CLIP BPE learns its merges from this text. It holds the words the parity cases use (the LAVIS
# negative prompt included, which must stay within 77 tokens) so that they are whole tokens, as in the
# real vocabulary; rarer words still split into several tokens, which exercises the merging.
BPE_CORPUS = """
a dog in the jungle, a dog on the beach, a cat on a red sofa, a red backpack, a backpack on a table
a teddy bear in the snow, a cat wearing sunglasses, a dog with a city in the background, swimming
over-exposure, under-exposure, saturated, duplicate, out of frame, lowres, cropped, worst quality,
low quality, jpeg artifacts, morbid, mutilated, out of frame, ugly, bad anatomy, bad proportions,
deformed, blurry, duplicate, a photo of a dog, a photo of a cat, a purple teddy bear, a shiny red dog
"""

# An uncased WordPiece vocabulary standing in for bert-base-uncased: the special tokens at BERT's
# positions relative to each other, whole words for the subjects, and every lowercase letter both as a
# word start and as a "##" continuation so that any lowercase word still tokenizes.
WORDPIECE_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDPIECE_WORDS = [
    "a", "the", "of", "and", "in", "on", "dog", "cat", "backpack", "teddy", "bear", "red", "plush", "##ie",
    "sloth", "grey", "duck", "toy", "can", "candle", "clock", "vase", "teapot", "boot", "sneak", "##er",
    "bowl", "berry", "robot", "car", "monster", "sun", "##glass", "##es", "pink", "color", "##ful", "shiny",
    "wolf", "poop", "emoji", "cartoon", "##s", "##ing", ",", "-", ".",
]
LETTERS = [chr(code) for code in range(ord("a"), ord("z") + 1)]
WORDPIECE_VOCAB = list(dict.fromkeys(
    WORDPIECE_SPECIAL + WORDPIECE_WORDS + LETTERS + ["##" + letter for letter in LETTERS]))


@dataclass(frozen=True)
class Architecture:
    """The configurations ``build`` makes a model of: constructor arguments of the reference's classes
    (the vocabulary sizes and special token ids apart, which come from the tokenizers)."""
    num_query_tokens: int
    image_size: int
    vision: dict[str, Any]  # Blip2VisionConfig
    qformer: dict[str, Any]  # Blip2QFormerConfig
    text: dict[str, Any]  # CLIPTextConfig
    unet: dict[str, Any]  # UNet2DConditionModel
    vae: dict[str, Any]  # AutoencoderKL
    clip_vocab: int | None  # the BPE vocabulary padded to this size; None: as trained
    wordpiece_vocab: int | None  # the WordPiece vocabulary padded to this size ("[DEC]" comes after it)
    # ControlNetModel.from_unet's conditioning_embedding_out_channels: one stride-2 convolution per entry
    # after the first, so the control image comes down to the latents' size (the VAE's factor).
    controlnet_embedding: tuple[int, ...] = (16, 32, 96, 256)

    @property
    def text_hidden(self) -> int:
        """The Q-Former's, the projection's and the CLIP text encoder's width alike."""
        return self.qformer["hidden_size"]


# The initializer ranges are BLIP-2's 0.02: Blip2VisionConfig's default, 1e-10, leaves the ViT's weights
# ~0 (its output would not depend on the image but for the perturbation). The ViT's LayerNorm eps is 1e-5,
# as LAVIS trained it and the real config states (the transformers default is 1e-6).
TINY = Architecture(
    num_query_tokens=4, image_size=32,
    vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, initializer_range=0.02),
    qformer=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=32, cross_attention_frequency=1, encoder_hidden_size=16),
    text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=77, hidden_act="quick_gelu"),
    # Two blocks each, so the U-Net's latent factor (2 ** (blocks - 1), which the reference uses) and the
    # VAE's are both 2, as both are 8 for Stable Diffusion.
    unet=dict(sample_size=16, layers_per_block=1, block_out_channels=(4, 8), norm_num_groups=2,
              cross_attention_dim=16, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    vae=dict(layers_per_block=1, block_out_channels=(4, 8), norm_num_groups=2, sample_size=32,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    clip_vocab=None, wordpiece_vocab=None, controlnet_embedding=(4, 8))
# Salesforce/blipdiffusion (FACTS.md, "Model"): CLIP ViT-L/14 without its last layer, the BERT-base
# Q-Former, CLIP ViT-L's text encoder, Stable Diffusion v1.5's U-Net and VAE.
REAL = Architecture(
    num_query_tokens=16, image_size=224,
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, initializer_range=0.02),
    qformer=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=512, cross_attention_frequency=1, encoder_hidden_size=1024,
                 layer_norm_eps=1e-12),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu"),
    unet=dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
              cross_attention_dim=768, attention_head_dim=8,
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    vae=dict(layers_per_block=2, block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    clip_vocab=49408, wordpiece_vocab=30522)
ARCHITECTURES = {"tiny": TINY, "real": REAL}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's and GPT-2's reversible byte → printable character map: printable Latin-1 bytes stand for
    themselves, the others move to code points from 256 upwards."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shift)
            shift += 1
    return dict(sorted(mapping.items()))


def train_clip_bpe(corpus: str, merges: int, size: int | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE: the 256 byte characters, the same with the "</w>" word end, the
    learnt merges, filler tokens up to ``size`` entries in all when given (where the real vocabulary has
    the rest of its merges; no merge makes them, so they are never produced), then <|startoftext|> and
    <|endoftext|> (CLIP's vocabulary order). Ties between equally frequent pairs go to the smallest pair,
    so the result is the same on every run."""
    byte_chars = bytes_to_unicode()
    words: collections.Counter[tuple[str, ...]] = collections.Counter()
    for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", corpus.lower()):
        symbols = [byte_chars[byte] for byte in word.encode("utf-8")]
        words[tuple(symbols[:-1]) + (symbols[-1] + "</w>",)] += 1

    learnt: list[tuple[str, str]] = []
    while len(learnt) < merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        learnt.append(best)
        merged: collections.Counter[tuple[str, ...]] = collections.Counter()
        for word, count in words.items():
            symbols: list[str] = []
            index = 0
            while index < len(word):
                if index + 1 < len(word) and (word[index], word[index + 1]) == best:
                    symbols.append(word[index] + word[index + 1])
                    index += 2
                else:
                    symbols.append(word[index])
                    index += 1
            merged[tuple(symbols)] += count
        words = merged

    tokens = list(dict.fromkeys([*byte_chars.values(), *(token + "</w>" for token in byte_chars.values()),
                                 *(first + second for first, second in learnt)]))
    if size is not None:
        tokens += [f"<|filler{index}|>" for index in range(len(tokens), size - 2)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, learnt


def write_clip_bpe(folder: Path, size: int | None) -> None:
    vocab, merges = train_clip_bpe(BPE_CORPUS, BPE_MERGES, size)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # CLIPTokenizer skips the first line of merges.txt: the version header.
    lines = ["#version: 0.2"] + [f"{first} {second}" for first, second in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def wordpiece_vocab(size: int | None) -> list[str]:
    """WORDPIECE_VOCAB, then "[unusedN]" fillers up to ``size`` entries when given (the word splitting cuts
    such a text at its brackets, so they are never produced)."""
    fillers = range(size - len(WORDPIECE_VOCAB)) if size is not None else range(0)
    return WORDPIECE_VOCAB + [f"[unused{index}]" for index in fillers]


def write_wordpiece(folder: Path, size: int | None) -> None:
    """The files of the bert-base-uncased tokenizer that BertTokenizer reads: vocab.txt and the same
    tokenizer_config.json as the real repository."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(wordpiece_vocab(size)) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "model_max_length": 512}), encoding="utf-8")


@contextmanager
def offline_hub_with_bert(bert_tokenizer: Path) -> Iterator[None]:
    """Point the Hugging Face libraries at a private, offline cache in which ``bert_tokenizer``'s files
    are the snapshot of ``bert-base-uncased``. Must run before transformers or diffusers is imported:
    huggingface_hub reads HF_HOME once, at import."""
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("the cache must be set up before huggingface_hub is imported")
    with tempfile.TemporaryDirectory(prefix="reference-hf-home-") as hf_home:
        repo = Path(hf_home) / "hub" / "models--bert-base-uncased"
        files = sorted(path for path in bert_tokenizer.iterdir() if path.is_file())
        revision = hashlib.sha1(b"".join(path.read_bytes() for path in files)).hexdigest()
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True)
        for path in files:
            shutil.copyfile(path, snapshot / path.name)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
        settings = {"HF_HOME": hf_home, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "HF_HUB_DISABLE_TELEMETRY": "1", "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}
        previous = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        try:
            yield
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def perturb_weights(modules: list[torch.nn.Module], seed: int) -> None:
    """Add seeded noise to every floating-point tensor of every module's state dict, keys in sorted
    order, so that no weight keeps its constructor's value (zeros, ones, or a shared initialisation
    pattern an implementation could get right by accident). Vectors (biases, norms) move by 0.1;
    matrices and kernels by 0.75/sqrt(fan-in): measured, another reference photo then moves the tiny
    model's 32x32 image by ~0.1 and a 1e-2 relative error in the subject embedding by ~1e-2, while a
    1e-6 error stays ~1e-6 (at 1.0/sqrt(fan-in) the denoising loop starts to amplify rounding)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            state = module.state_dict(keep_vars=True)
            for key in sorted(state):
                tensor = state[key]
                if not tensor.is_floating_point():
                    continue
                fan_in = tensor[0].numel() if tensor.dim() >= 2 else 0
                scale = 0.75 / fan_in**0.5 if fan_in > 1 else 0.1
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                tensor.add_((noise * scale).to(tensor.dtype))


def build(out: Path, bert_tokenizer: Path, serialization: str, architecture: Architecture, controlnet: bool) -> None:
    write_wordpiece(bert_tokenizer, architecture.wordpiece_vocab)
    with offline_hub_with_bert(bert_tokenizer), tempfile.TemporaryDirectory() as scratch:
        # Imported here, after the private cache is in place (see offline_hub_with_bert).
        from diffusers import (AutoencoderKL, BlipDiffusionControlNetPipeline, BlipDiffusionPipeline, ControlNetModel,
                               PNDMScheduler, UNet2DConditionModel)
        from diffusers.pipelines.blip_diffusion.blip_image_processing import BlipImageProcessor
        from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
        from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
        from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, CLIPTextConfig, CLIPTokenizer

        write_clip_bpe(Path(scratch), architecture.clip_vocab)
        tokenizer = CLIPTokenizer(str(Path(scratch) / "vocab.json"), str(Path(scratch) / "merges.txt"))

        # The constructors initialise from the global generator: seed it so every build is the same.
        torch.manual_seed(PERTURBATION_SEED)
        vision = Blip2VisionConfig(image_size=architecture.image_size, **architecture.vision)
        # The reference adds "[DEC]" to the WordPiece vocabulary, as the next id.
        qformer_config = Blip2QFormerConfig(vocab_size=len(wordpiece_vocab(architecture.wordpiece_vocab)) + 1,
                                            **architecture.qformer)
        qformer = Blip2QFormerModel(Blip2Config(
            vision_config=vision.to_dict(), qformer_config=qformer_config.to_dict(),
            num_query_tokens=architecture.num_query_tokens))
        text_encoder = ContextCLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, **architecture.text))
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **architecture.unet)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215,
                            **architecture.vae)
        # Stable Diffusion v1.5's scheduler configuration.
        scheduler = PNDMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
        image_processor = BlipImageProcessor(
            size={"height": architecture.image_size, "width": architecture.image_size}, image_mean=CLIP_MEAN,
            image_std=CLIP_STD)
        perturb_weights([qformer, text_encoder, unet, vae], PERTURBATION_SEED)
        modules = [qformer, text_encoder, unet, vae]
        components = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler,
                          qformer=qformer, image_processor=image_processor, ctx_begin_pos=2, mean=CLIP_MEAN, std=CLIP_STD)
        if controlnet:
            # As ControlNets are made: from the U-Net's encoder, then perturbed apart (with their own seed, so
            # the other components stay the same as without one), the zero convolutions included.
            net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=architecture.controlnet_embedding)
            perturb_weights([net], PERTURBATION_SEED + 1)
            modules.append(net)
            pipe = BlipDiffusionControlNetPipeline(controlnet=net, **components)
        else:
            pipe = BlipDiffusionPipeline(**components)
        pipe.save_pretrained(out, safe_serialization=serialization == "safetensors")
    parameters = sum(parameter.numel() for module in modules for parameter in module.parameters())
    print(f"built {out} ({serialization}, {parameters:,} parameters, "
          f"{sum(f.stat().st_size for f in out.rglob('*') if f.is_file()):,} bytes)")


def is_batch(case: dict[str, Any]) -> bool:
    """Whether the case is one batch call: ``prompt``, ``reference_image``, ``source_subject`` and
    ``target_subject`` are then lists of one entry per prompt (``crop``, when given, a list of boxes or
    nulls), and image i uses reference i and categories i. Otherwise each is a single string."""
    return isinstance(case["prompt"], list)


def reference_paths(case: dict[str, Any]) -> list[str]:
    """The case's reference photos, relative to the DreamBench dataset folder."""
    return list(case["reference_image"]) if is_batch(case) else [case["reference_image"]]


def open_reference_image(images: Path, case: dict[str, Any]) -> Image.Image | list[Image.Image]:
    """The case's reference photo as a PIL image (a list of them, one per prompt, for a batch case), cut
    to the case's ``crop`` box (left, top, right, bottom) when it has one: DreamBench's photos are all
    square, and a crop is how a case exercises the resize of a non-square image (the reference squashes
    it, without keeping the aspect ratio)."""
    paths = reference_paths(case)
    crops = (case.get("crop") or [None] * len(paths)) if is_batch(case) else [case.get("crop")]
    opened = [Image.open(images / path) for path in paths]
    opened = [image.crop(tuple(crop)) if crop else image for image, crop in zip(opened, crops, strict=True)]
    return opened if is_batch(case) else opened[0]


def open_control_image(images: Path, case: dict[str, Any]) -> Image.Image:
    """A ControlNet case's conditioning image, a photo used as it is (the reference computes no edges),
    cut to its ``control_crop`` box so that the resize to the output size is exercised."""
    image = Image.open(images / case["control_image"]).convert("RGB")
    return image.crop(tuple(case["control_crop"])) if case.get("control_crop") else image


def call_pipeline(pipe: Any, case: dict[str, Any], reference_image: Image.Image | list[Image.Image],
                  hooks: list[torch.utils.hooks.RemovableHandle], images: Path) -> np.ndarray:
    """The call both pipelines take alike (blipdiff's is a drop-in): the case's arguments in the
    reference's order, ``output_type="np"``; ``hooks`` are removed afterwards. A ControlNet case (one
    with a ``control_image``) goes to the ControlNet pipeline with its conditioning image after the
    reference image. A batch case passes its
    lists as they are (one reference image per prompt) and one negative prompt, which each pipeline
    tokenises once per prompt."""
    try:
        control = [open_control_image(images, case)] if "control_image" in case else []
        return pipe(
            case["prompt"], reference_image, *control, case["source_subject"], case["target_subject"],
            guidance_scale=case["guidance_scale"], height=case["height"], width=case["width"],
            num_inference_steps=case["num_inference_steps"],
            generator=torch.Generator("cpu").manual_seed(case["seed"]),
            neg_prompt=case["negative_prompt"], output_type="np").images
    finally:
        for hook in hooks:
            hook.remove()


def run_case(pipe: Any, case: dict[str, Any], images: Path) -> dict[str, np.ndarray]:
    """One case through the reference pipeline, with the intermediate tensors captured where the
    pipeline hands them on (so they are what it used, not a re-derivation)."""
    reference_image = open_reference_image(images, case)
    captured: dict[str, list[torch.Tensor]] = collections.defaultdict(list)

    def keep(name: str, tensor: torch.Tensor) -> None:
        captured[name].append(tensor.detach().clone())

    hooks = [
        pipe.qformer.register_forward_pre_hook(
            lambda _m, _args, kwargs: keep("pixel_values", kwargs["image_input"]), with_kwargs=True),
        pipe.qformer.embeddings.register_forward_pre_hook(
            lambda _m, _args, kwargs: keep("subject_ids", kwargs["input_ids"]), with_kwargs=True),
        # The prompt first, then (guided only) the negative prompt.
        pipe.text_encoder.register_forward_pre_hook(
            lambda _m, _args, kwargs: keep("text_ids", kwargs["input_ids"]), with_kwargs=True),
        pipe.unet.register_forward_pre_hook(
            lambda _m, _args, kwargs: keep("context", kwargs["encoder_hidden_states"]), with_kwargs=True),
        # decode() divides by the scaling factor before post_quant_conv; undo it to report the latents.
        pipe.vae.post_quant_conv.register_forward_pre_hook(
            lambda _m, args: keep("final_latents", args[0] * pipe.vae.config.scaling_factor)),
    ]
    image = call_pipeline(pipe, case, reference_image, hooks, images)

    # As the pipeline computes them: one batch of every reference photo with its source category.
    pixel_values = pipe.image_processor.preprocess(
        reference_image, image_mean=pipe.config.mean, image_std=pipe.config.std, return_tensors="pt")["pixel_values"]
    sources = case["source_subject"] if is_batch(case) else [case["source_subject"]]
    with torch.no_grad():
        subject_embedding = pipe.qformer(image_input=pixel_values, text_input=sources, return_dict=False)
    outputs = {
        "image": np.asarray(image if is_batch(case) else image[0], dtype=np.float32),
        "subject_embedding": subject_embedding.numpy(),
        "pixel_values": captured["pixel_values"][0].numpy(),
        "subject_ids": captured["subject_ids"][0].numpy(),
        "prompt_ids": captured["text_ids"][0].numpy(),
        "context": captured["context"][0].numpy(),
        "final_latents": captured["final_latents"][0].numpy(),
    }
    if len(captured["text_ids"]) > 1:
        outputs["negative_ids"] = captured["text_ids"][1].numpy()
    return outputs


def generate(model: Path, bert_tokenizer: Path, cases_file: Path, images: Path, out: Path) -> None:
    cases = json.loads(cases_file.read_text())
    with offline_hub_with_bert(bert_tokenizer):
        from diffusers import BlipDiffusionControlNetPipeline, BlipDiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        pipes = {}
        if any("control_image" not in case for case in cases):
            pipes[False] = BlipDiffusionPipeline.from_pretrained(model)
        if any("control_image" in case for case in cases):
            pipes[True] = BlipDiffusionControlNetPipeline.from_pretrained(model)
        for pipe in pipes.values():
            pipe.set_progress_bar_config(disable=True)
        arrays: dict[str, np.ndarray] = {}
        for case in cases:
            for key, value in run_case(pipes["control_image" in case], case, images).items():
                arrays[f"{case['name']}.{key}"] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    print(f"wrote {len(cases)} cases to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build and save a random reference checkpoint")
    build_parser.add_argument("--out", type=Path, required=True)
    build_parser.add_argument("--bert-tokenizer", type=Path, required=True,
                              help="folder to write the tiny WordPiece tokenizer to (bert-base-uncased's stand-in)")
    build_parser.add_argument("--format", choices=["bin", "safetensors"], default="safetensors")
    build_parser.add_argument("--size", choices=list(ARCHITECTURES), default="tiny",
                              help="a tiny model, or the released checkpoint's architecture")
    build_parser.add_argument("--controlnet", action="store_true",
                              help="add a random ControlNet (the layout of Salesforce/blipdiffusion-controlnet)")
    generate_parser = commands.add_parser("generate", help="run the parity cases through the reference pipeline")
    generate_parser.add_argument("--model", type=Path, required=True)
    generate_parser.add_argument("--bert-tokenizer", type=Path, required=True,
                                 help="the folder build wrote, served as the cached bert-base-uncased")
    generate_parser.add_argument("--cases", type=Path, required=True)
    generate_parser.add_argument("--images", type=Path, required=True,
                                 help="the folder the cases' reference_image paths are relative to")
    generate_parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "build":
        build(args.out, args.bert_tokenizer, args.format, ARCHITECTURES[args.size], args.controlnet)
    else:
        generate(args.model, args.bert_tokenizer, args.cases, args.images, args.out)


if __name__ == "__main__":
    main()
