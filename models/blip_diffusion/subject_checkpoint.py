"""A subject checkpoint, as ``blipdiff finetune`` writes it: ``subject.json`` (written last: the
checkpoint is complete once it is there), the trained subject embedding, and either the fine-tuned
U-Net (``full``) or a LoRA adapter on the U-Net's attention projections (``lora``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from blipdiff.models.blip_diffusion.checkpoint import CheckpointError, raise_for_keys

SUBJECT_FILE = "subject.json"
EMBEDDING_FILE = "subject_embedding.safetensors"
UNET_FOLDER = "unet"
LORA_FOLDER = "unet_lora"
LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def read_record(folder: Path) -> dict[str, Any]:
    path = folder / SUBJECT_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a subject checkpoint: it has no {SUBJECT_FILE}")
    return json.loads(path.read_text())


def apply_subject(unet: torch.nn.Module, folder: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    """The U-Net with the subject's weights (a new one for ``full``, ``unet`` with the adapter for
    ``lora``) and the subject embedding [1, Q, D]."""
    import diffusers

    record = read_record(folder)
    embeds = load_file(folder / EMBEDDING_FILE)["subject_embeds"]
    if record["mode"] == "full":
        tuned = diffusers.UNet2DConditionModel.from_pretrained(folder / UNET_FOLDER, torch_dtype=unet.dtype)
        def architecture(config) -> dict[str, Any]:  # the config without bookkeeping such as "_name_or_path"
            return {key: value for key, value in dict(config).items() if not key.startswith("_")}

        if architecture(tuned.config) != architecture(unet.config):
            raise CheckpointError(f"{folder}: its U-Net is not the model's architecture")
        return tuned.to(unet.device).eval(), embeds
    from peft import LoraConfig, set_peft_model_state_dict

    settings = json.loads((folder / LORA_FOLDER / LORA_CONFIG).read_text())
    unet.add_adapter(LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"],
                                target_modules=settings["target_modules"]))
    state = load_file(folder / LORA_FOLDER / LORA_WEIGHTS)
    result = set_peft_model_state_dict(unet, state)
    raise_for_keys(f"{folder / LORA_FOLDER}", [k for k in result.missing_keys if "lora_" in k], result.unexpected_keys)
    return unet, embeds
