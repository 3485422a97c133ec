"""Small random models with working processors and tokenizers, saved like real weights: the demo's
BLIP-Diffusion and metric models (its images are noise and its scores mean nothing), and the tests'.

Nothing is downloaded: tokenizers are built from CORPUS, models from small configurations with fixed seeds,
and everything is written in the official layouts, so the code that reads them loads them through the same
``from_pretrained`` path as real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

NUM_QUERY_TOKENS = 4


# The tiny byte-level BPEs learn their merges from these; any text still encodes, byte by byte.
CORPUS = [
    "a photo of a dog sitting on the grass in the park",
    "a red coffee cup on a wooden table next to a spoon",
    "a cat sleeping on a sofa near the window",
    "a camera on a desk with a backpack and a clock",
    "a teddy bear plushie and a candle on a shelf",
] * 8
def clip_tokenizer() -> transformers.CLIPTokenizer:
    """A CLIP tokenizer (byte-level BPE with "</w>" word ends) trained on CORPUS."""
    return transformers.CLIPTokenizer().train_new_from_iterator(CORPUS, vocab_size=400)


def fixed_clip_tokenizer() -> transformers.CLIPTokenizer:
    """A CLIP tokenizer with the same vocabulary in every process: CLIP's byte alphabet (with and without
    "</w>"), then one chain of merges per word of CORPUS. (The BPE trainer orders its alphabet and breaks
    ties by hash, so two trainings give different ids; two BLIP-Diffusion builds with the same seed,
    in one process or two, must be identical.)"""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    merges = []
    for word in sorted({word for line in CORPUS for word in line.split()}):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
                vocab.setdefault(merged + symbol, len(vocab))
            merged += symbol
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def save_tiny_clip(folder: Path) -> Path:
    """A random CLIP for the ranking: 32x32 images, hidden sizes 32, two layers."""
    tokenizer = clip_tokenizer()
    text = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    torch.manual_seed(1)
    transformers.CLIPModel(config).save_pretrained(folder)
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                         crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_dino(folder: Path) -> Path:
    """A random ViT at DINO's input size (224; patch 32 to stay small), saved with a pooler as the hub's
    facebook/dino-vits16 is."""
    config = transformers.ViTConfig(image_size=224, patch_size=32, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    transformers.ViTModel(config, add_pooling_layer=True).save_pretrained(folder)
    return folder


# A WordPiece vocabulary for the Q-Former's subject text, in bert-base-uncased's order of specials.
SUBJECT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "red", "back", "##pack", "teddy",
                 "bear", "can", "##dle", "clock", "vase", "toy", "shoe", "##s", "the", "of", "photo", "robot", "duck"]


def subject_tokenizer(folder: Path) -> Path:
    """A tiny uncased WordPiece tokenizer, saved as bert-base-uncased is (vocab.txt, no [DEC])."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SUBJECT_VOCAB) + "\n")
    # transformers 5's BertTokenizer ignores a vocab_file argument (it would hold the five specials only).
    transformers.BertTokenizer(vocab={token: i for i, token in enumerate(SUBJECT_VOCAB)}).save_pretrained(folder)
    return folder


def perturb(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.1) -> None:
    """Random weights everywhere (zeros and ones included), so every input changes every output."""
    with torch.no_grad():
        for _, value in sorted(module.state_dict().items()):
            if value.is_floating_point():
                value.add_(torch.randn(value.shape, generator=generator) * scale)


def _tiny_blip_diffusion_modules(qformer_config, text_config, text_only: torch.nn.Module | None = None,
                                 ) -> dict[str, torch.nn.Module]:
    """The tiny U-Net and VAE with the Q-Former and context text encoder, or (``text_only``: a Stable
    Diffusion's) with that text encoder alone."""
    import diffusers
    from blipdiff.models.blip_diffusion import ContextCLIPTextModel, SubjectEncoder

    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
    if text_only is not None:
        return {"text_encoder": text_only, "unet": unet, "vae": vae}
    return {"qformer": SubjectEncoder(qformer_config), "text_encoder": ContextCLIPTextModel(text_config),
            "unet": unet, "vae": vae}


def _tiny_text_config(tokenizer) -> transformers.CLIPTextConfig:
    """The tiny CLIP text encoder both tiny models share (BLIP-Diffusion's context encoder, SD's)."""
    return transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def save_tiny_stable_diffusion(folder: Path, seed: int = 0) -> Path:
    """A random Stable Diffusion in the diffusers layout (``StableDiffusionPipeline.save_pretrained``, no
    safety checker), with the tiny BLIP-Diffusion's U-Net, VAE, CLIP text encoder and tokenizer shapes."""
    import diffusers

    tokenizer = fixed_clip_tokenizer()
    tokenizer.model_max_length = 77  # as Stable Diffusion's tokenizer_config.json has it
    text_config = _tiny_text_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = _tiny_blip_diffusion_modules(None, None, text_only=transformers.CLIPTextModel(text_config))
    generator = torch.Generator().manual_seed(seed)
    for module in modules.values():
        perturb(module, generator)
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    diffusers.StableDiffusionPipeline(
        vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=tokenizer, unet=modules["unet"],
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_controlnet(seed: int = 0):
    """A random ControlNet for the tiny U-Net (its blocks, a conditioning embedding that downscales by 2
    like the tiny VAE), every weight perturbed: the zero-initialised output convolutions too, which a
    fresh ControlNet has and which would make it change nothing."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = diffusers.ControlNetModel(
            in_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8, conditioning_embedding_out_channels=(8, 16))
    perturb(net, torch.Generator().manual_seed(seed + 1))
    return net.eval()


def save_tiny_controlnet(folder: Path, seed: int = 0) -> Path:
    """A tiny ControlNet in a Stable Diffusion ControlNet's own layout (config.json and safetensors at the root)."""
    tiny_controlnet(seed).save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_blip_diffusion(folder: Path, weights: str = "safetensors", tokenizer_entry: Path | None = None,
                             tokenizer_copy: bool = True, seed: int = 0, qformer_dropout: float = 0.1,
                             controlnet: bool = False) -> Path:
    """A random BLIP-Diffusion in the released checkpoint's layout, written file by file as the hub has
    it (not by blipdiff's save_pretrained): 32x32 reference images, 4 query tokens, hidden sizes 16-32,
    a U-Net and VAE that downscale by 2. ``weights``: "safetensors" or "bin" (pickled, as on the hub).
    The subject tokenizer is named by qformer/config.json's ``tokenizer`` entry and/or copied into
    qformer/tokenizer/. ``qformer_dropout``: the Q-Former's hidden and attention dropout (BERT's 0.1, as
    released; with 0, training does not depend on how a batch is split over workers)."""
    import json

    import diffusers
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vision = transformers.Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=8, hidden_act="quick_gelu",
                                            layer_norm_eps=1e-5)
    qformer = transformers.Blip2QFormerConfig(vocab_size=len(SUBJECT_VOCAB) + 1, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32,
                                              cross_attention_frequency=1, max_position_embeddings=64,
                                              hidden_dropout_prob=qformer_dropout,
                                              attention_probs_dropout_prob=qformer_dropout)
    qformer_config = transformers.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                              num_query_tokens=NUM_QUERY_TOKENS)
    tokenizer = fixed_clip_tokenizer()
    text_config = _tiny_text_config(tokenizer)
    # The modules' own initialisation draws from the global generator: seed it too (without disturbing
    # the caller's), so that the same seed gives the same weights in every process and every call.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = _tiny_blip_diffusion_modules(qformer_config, text_config)
    for module in modules.values():
        perturb(module, generator)

    configs = {"qformer": qformer_config.to_dict(), "text_encoder": text_config.to_dict()}
    if tokenizer_entry is not None:
        configs["qformer"]["tokenizer"] = str(tokenizer_entry)
    for name, module in modules.items():
        (folder / name).mkdir(exist_ok=True)
        if name in configs:
            (folder / name / "config.json").write_text(json.dumps(configs[name]))
            stem = "model" if weights == "safetensors" else "pytorch_model"
        else:
            (folder / name / "config.json").write_text(json.dumps(dict(module.config)))
            stem = "diffusion_pytorch_model"
        state = {key: value.contiguous() for key, value in module.state_dict().items()}
        if weights == "safetensors":
            save_file(state, folder / name / f"{stem}.safetensors", metadata={"format": "pt"})
        else:
            torch.save(state, folder / name / f"{stem}.bin")
    if tokenizer_copy:
        subject_tokenizer(folder / "qformer" / "tokenizer")
    (folder / "tokenizer").mkdir(exist_ok=True)
    tokenizer.backend_tokenizer.model.save(str(folder / "tokenizer"))  # vocab.json + merges.txt, as on the hub
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                            set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
    (folder / "image_processor").mkdir(exist_ok=True)
    (folder / "image_processor" / "preprocessor_config.json").write_text(json.dumps(
        {"do_center_crop": True, "do_normalize": True, "do_resize": True, "do_rescale": True, "resample": 3,
         "rescale_factor": 1 / 255, "size": {"height": 32, "width": 32}, "image_processor_type": "BlipImageProcessor"}))
    index = {"_class_name": "BlipDiffusionPipeline", "_diffusers_version": "0.21.0.dev0", "ctx_begin_pos": 2,
             "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
             "image_processor": ["blip_diffusion", "BlipImageProcessor"],
             "qformer": ["blip_diffusion", "Blip2QFormerModel"], "scheduler": ["diffusers", "PNDMScheduler"],
             "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if controlnet:
        tiny_controlnet(seed).save_pretrained(folder / "controlnet", safe_serialization=weights == "safetensors")
        index["controlnet"] = ["diffusers", "ControlNetModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
