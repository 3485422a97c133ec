"""The model side of stage-2 pre-training: the pipeline to train, gradient checkpointing, and a batch of
samples as the objective's tensors (see ``tasks/pretrain`` for the run)."""

from __future__ import annotations

from pathlib import Path


def load_training_pipeline(init: str, reset_from_sd: str | None, resume_from: Path | None):
    """The pipeline to train: a checkpoint of this run, or ``init`` (with Stable Diffusion's U-Net, text
    encoder and VAE when ``reset_from_sd``), in float32."""
    import diffusers
    from transformers import CLIPTextConfig

    from blipdiff.models.blip_diffusion import BlipDiffusionPipeline, checkpoint
    from blipdiff.models.blip_diffusion.text_encoder import ContextCLIPTextModel

    if resume_from is not None:
        return BlipDiffusionPipeline.from_pretrained(resume_from)
    pipe = BlipDiffusionPipeline.from_pretrained(init)
    if reset_from_sd is not None:
        import torch

        root = checkpoint.resolve(reset_from_sd, ("unet", "vae", "text_encoder"),
                                  kind="Stable Diffusion checkpoint (unet, vae, text_encoder)")
        text_config = checkpoint.parse_config(
            CLIPTextConfig, checkpoint.read_json(root / "text_encoder" / "config.json"), "text_encoder")
        if text_config.hidden_size != pipe.text_encoder.config.hidden_size:
            raise checkpoint.CheckpointError(
                f"{reset_from_sd}: its text encoder's width {text_config.hidden_size} is not the subject "
                f"embeddings' {pipe.text_encoder.config.hidden_size}")
        pipe.text_encoder = checkpoint.load_module(ContextCLIPTextModel, text_config, root / "text_encoder", "text_encoder")
        pipe.unet = checkpoint.load_diffusers_model(diffusers.UNet2DConditionModel, root, "unet", torch.float32)
        pipe.vae = checkpoint.load_diffusers_model(diffusers.AutoencoderKL, root, "vae", torch.float32)
    return pipe


def enable_gradient_checkpointing(objective) -> None:
    """The U-Net through diffusers; the Q-Former's and the text encoder's transformers layers directly
    (they are not transformers ``PreTrainedModel``s, whose switch would do this)."""
    import functools

    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    objective.unet.enable_gradient_checkpointing()
    for module in (objective.qformer.encoder, objective.text_encoder):
        for layer in module.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                layer.gradient_checkpointing = True
                layer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint,
                                                                       use_reentrant=False)


def batch_inputs(pipe, batch: dict, device) -> dict:
    """A batch of samples (numpy, from the data stream) → the objective's tensors on ``device``."""
    import numpy as np
    import torch

    def tensor(array, dtype=None) -> torch.Tensor:
        # Ray Data hands out read-only arrays: torch gets its own copy.
        return torch.tensor(np.asarray(array), dtype=dtype).to(device, non_blocking=True)

    length = pipe.text_encoder.config.max_position_embeddings - pipe.qformer.num_query_tokens
    text = pipe.tokenizer([str(t) for t in batch["text"]], padding="max_length", truncation=True, max_length=length,
                          return_tensors="pt")
    subject = pipe.subject_tokenizer([str(s) for s in batch["subject"]], padding=True, return_tensors="pt")
    return {
        "pixel_values": tensor(batch["pixel_values"]),
        "subject_ids": subject.input_ids.to(device), "subject_mask": subject.attention_mask.to(device),
        "text_ids": text.input_ids.to(device),
        # Just before the end token: the last position that is not padding.
        "insert_at": (text.attention_mask.sum(dim=1) - 1).to(device),
        "keep_subject": tensor(batch["keep_subject"], torch.bool),
        "latents": tensor(batch["latents"]), "noise": tensor(batch["noise"]),
        "timesteps": tensor(batch["timestep"], torch.long),
    }
