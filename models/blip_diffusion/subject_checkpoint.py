"""A subject checkpoint, as ``blipdiff finetune`` writes it: ``subject.json`` (written last: the
checkpoint is complete once it is there), the trained subject embedding, and either the fine-tuned
U-Net (``full``) or a LoRA adapter on the U-Net's attention projections (``lora``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from blipdiff.models.blip_diffusion.checkpoint import CheckpointError, read_record

SUBJECT_FILE = "subject.json"
EMBEDDING_FILE = "subject_embedding.safetensors"
UNET_FOLDER = "unet"
LORA_FOLDER = "unet_lora"  # diffusers' save_lora_adapter: the weights, with peft's LoraConfig in their metadata
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def read_subject_record(folder: Path) -> dict[str, Any]:
    return read_record(folder, SUBJECT_FILE, "subject checkpoint")


def apply_subject(unet: torch.nn.Module, folder: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    """The U-Net with the subject's weights (a new one for ``full``, ``unet`` with the adapter for
    ``lora``) and the subject embedding [1, Q, D]."""
    import diffusers

    record = read_subject_record(folder)
    embeds = load_file(folder / EMBEDDING_FILE)["subject_embeds"]
    if record["mode"] == "full":
        tuned = diffusers.UNet2DConditionModel.from_pretrained(folder / UNET_FOLDER, torch_dtype=unet.dtype)
        def architecture(config) -> dict[str, Any]:  # the config without bookkeeping such as "_name_or_path"
            return {key: value for key, value in dict(config).items() if not key.startswith("_")}

        if architecture(tuned.config) != architecture(unet.config):
            raise CheckpointError(f"{folder}: its U-Net is not the model's architecture")
        return tuned.to(unet.device).eval(), embeds
    unet.load_lora_adapter(folder / LORA_FOLDER, prefix=None, weight_name=LORA_WEIGHTS, use_safetensors=True)
    return unet, embeds
