"""Stable Diffusion for DreamBooth: a base (Stable Diffusion 1.5 in the diffusers layout, or the U-Net, text encoder and
VAE of a BLIP-Diffusion checkpoint, which has Stable Diffusion 1.5's architecture but whose U-Net and text
encoder stage-2 pre-training trained further) as a diffusers ``StableDiffusionPipeline``, and a DreamBooth
subject checkpoint applied to it.

A subject checkpoint, as ``blipdiff dreambooth`` writes it: ``dreambooth.json`` (written last: the
checkpoint is complete once it is there) and what training changed: the U-Net, and the text encoder
when it was trained (``full``), or peft LoRA adapters on their attention projections (``lora``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from blipdiff.models.blip_diffusion import checkpoint
from blipdiff.models.blip_diffusion.checkpoint import CheckpointError

RECORD_FILE = "dreambooth.json"
UNET_FOLDER = "unet"
TEXT_ENCODER_FOLDER = "text_encoder"
UNET_LORA = "unet_lora"
TEXT_ENCODER_LORA = "text_encoder_lora"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def instance_prompt(identifier: str, class_noun: str) -> str:
    """The subject's photos' label: "a [identifier] [class noun]"."""
    return f"a {identifier} {class_noun}"


def class_prompt(class_noun: str) -> str:
    return f"a {class_noun}"


def resolve_base(base: str | os.PathLike) -> Path:
    """A base model's folder (a hub id fetched), checked to hold Stable Diffusion's components."""
    return checkpoint.resolve(base, COMPONENTS, kind=f"Stable Diffusion checkpoint ({', '.join(COMPONENTS)})")


# Stable Diffusion 1.5's architecture, as its component configs state it.
SD15_ARCHITECTURE = {
    "unet": {"in_channels": 4, "out_channels": 4, "sample_size": 64, "cross_attention_dim": 768,
             "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8},
    "text_encoder": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "vae": {"latent_channels": 4, "block_out_channels": [128, 256, 512, 512]},
}


def not_stable_diffusion_15(base: str | os.PathLike) -> str | None:
    """Why ``base`` is not Stable Diffusion 1.5, or None when it is: its ``model_index.json`` names a
    ``StableDiffusionPipeline`` (a BLIP-Diffusion checkpoint's does not: stage-2 pre-training trained its
    U-Net and text encoder) and its U-Net, text encoder and VAE configs have SD1.5's architecture. Decided
    by the configs alone: Stable Diffusion 1.4, or a fine-tune of 1.5, passes too."""
    root = resolve_base(base)
    pipeline = checkpoint.read_index(root, COMPONENTS).get("_class_name")
    if pipeline != "StableDiffusionPipeline":
        if pipeline == "BlipDiffusionPipeline":
            return ("a BLIP-Diffusion checkpoint, whose U-Net and text encoder BLIP-Diffusion's stage-2 "
                    "pre-training trained")
        return f"a {pipeline or 'pipeline without a class name'}, not a StableDiffusionPipeline"
    for component, expected in SD15_ARCHITECTURE.items():
        config = checkpoint.read_json(root / component / "config.json")
        differing = sorted(key for key, value in expected.items() if config.get(key) != value)
        if differing:
            return f"its {component} is not Stable Diffusion 1.5's architecture: {', '.join(differing)} differ"
    return None


def load_stable_diffusion(base: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | None = None):
    """A ``StableDiffusionPipeline`` (no safety checker) from a Stable Diffusion 1.5 checkpoint in the
    diffusers layout or a BLIP-Diffusion checkpoint (hub id or folder): its U-Net, VAE, scheduler,
    tokenizer and text encoder, the latter as a plain CLIP text model (BLIP-Diffusion's context text
    encoder has its architecture and key names), every key accounted for."""
    import diffusers
    import transformers

    root = resolve_base(base)
    index = checkpoint.read_index(root, COMPONENTS)
    text_config = checkpoint.parse_config(
        transformers.CLIPTextConfig, checkpoint.read_json(root / "text_encoder" / "config.json"), "text_encoder")
    # transformers' own loader: it reads the classic "text_model."-prefixed keys (Stable Diffusion's, and
    # BLIP-Diffusion's context text encoder's) into today's CLIPTextModel.
    text_encoder, info = transformers.CLIPTextModel.from_pretrained(root / "text_encoder", config=text_config,
                                                                    dtype=dtype, output_loading_info=True)
    checkpoint.raise_for_keys("text_encoder", info["missing_keys"], info["unexpected_keys"],
                              [str(key) for key in info.get("mismatched_keys", [])])
    unet = checkpoint.load_diffusers_model(diffusers.UNet2DConditionModel, root, "unet", dtype)
    vae = checkpoint.load_diffusers_model(diffusers.AutoencoderKL, root, "vae", dtype)
    scheduler_class = getattr(diffusers, index["scheduler"][1], None)
    if scheduler_class is None:
        raise CheckpointError(f"scheduler: diffusers has no {index['scheduler'][1]}")
    scheduler = scheduler_class.from_pretrained(root, subfolder="scheduler")
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
    except (OSError, ValueError) as error:
        raise CheckpointError(f"tokenizer: cannot load {root / 'tokenizer'} ({error})") from error
    # Stable Diffusion pads and truncates prompts to the tokenizer's model_max_length, which a tokenizer
    # folder without tokenizer_config.json (BLIP-Diffusion's has only vocab.json and merges.txt) leaves
    # unbounded: the text encoder's own length bounds it.
    tokenizer.model_max_length = min(tokenizer.model_max_length, text_config.max_position_embeddings)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def read_dreambooth_record(folder: Path) -> dict[str, Any]:
    return checkpoint.read_record(folder, RECORD_FILE, "DreamBooth checkpoint")


def apply_dreambooth(pipe, folder: str | os.PathLike) -> dict[str, Any]:
    """Apply a DreamBooth subject checkpoint to a base ``StableDiffusionPipeline`` in place; returns its
    record (identifier, class noun, settings). Prompts name the subject as "[identifier] [class noun]"."""
    from safetensors.torch import load_file

    folder = Path(folder)
    record = read_dreambooth_record(folder)
    if record["mode"] == "full":
        for name, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
            weights = folder / name / "model.safetensors"
            if weights.is_file():
                state = load_file(weights)
                missing, unexpected = module.load_state_dict(
                    {key: value.to(module.dtype) for key, value in state.items()}, strict=False)
                if unexpected or [key for key in missing if not key.endswith("position_ids")]:
                    raise CheckpointError(f"{folder}: its {name} is not the base model's architecture")
        return record
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    pipe.unet.load_lora_adapter(folder / UNET_LORA, prefix=None, weight_name=LORA_WEIGHTS, use_safetensors=True)
    text_lora = folder / TEXT_ENCODER_LORA / LORA_WEIGHTS
    if text_lora.is_file():
        inject_adapter_in_model(LoraConfig(r=record["settings"]["lora_rank"], lora_alpha=record["settings"]["lora_rank"],
                                           target_modules=TEXT_LORA_TARGETS), pipe.text_encoder)
        set_peft_model_state_dict(pipe.text_encoder, load_file(text_lora))
    return record


def load_dreambooth(base: str | os.PathLike, folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | None = None):
    """The base model with a DreamBooth subject checkpoint applied, ready for prompts such as
    "a sks dog in the jungle"."""
    pipe = load_stable_diffusion(base, dtype)
    apply_dreambooth(pipe, folder)
    return pipe.to(device) if device is not None else pipe
