"""Few-step subject fine-tuning, LAVIS's released recipe: a subject checkpoint from a handful of photos.

The subject embedding starts as the mean of the subject encoder's embeddings of the photos (LAVIS's
evaluation transform: Resize(224) + CenterCrop(224)) and is trained with the U-Net; the text encoder, the
Q-Former and the ViT stay frozen. Each step denoises the photos' latents (Resize(512) + CenterCrop(512),
encoded once by the frozen VAE and sampled from their distribution each step) under the prompt
"a {subject}" with the embedding spliced in, and minimises the mean squared error of the predicted noise
on the checkpoint's DDPM schedule. AdamW, by default at 5e-6 in ``full`` mode (LAVIS and the paper's
appendix; its main text says 5e-5) and 2e-4 in ``lora`` mode (diffusers' LoRA recipes; see
``learning_rate``), weight decay 0.01 on weight matrices only, batch 3, bf16 autocast over fp32 master
weights.

``full`` trains every U-Net weight and saves the U-Net (bf16 by default) with the embedding; ``lora``
trains a peft adapter on the U-Net's attention projections and saves only it (a few MB) with the
embedding. ``BlipDiffusionPipeline.load_subject`` reads either.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from blipdiff.infra.atomic import atomic_folder
from blipdiff.infra.inputs import ImageSide, SubjectText, find_photos, model_location
from blipdiff.infra.run_folder import claim_run_folder
from blipdiff.models.devices import AUTO, DEVICE_HELP, resolve_device
from blipdiff.models.training.learning_rate import fill_default_lr


class FinetuneConfig(BaseModel):
    """One ``blipdiff finetune`` run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Hub id or local checkpoint folder in the official layout.")
    images: list[Path] = Field(min_length=1, description="Photo of the subject, or a folder of them; repeatable.")
    subject: SubjectText = Field(description="The subject's category, e.g. dog.")
    out: Path = Field(description="Folder for the subject checkpoint.")
    steps: int = Field(80, ge=1, description="Training steps (the paper: 40 to 120).")
    lr: float | None = Field(None, gt=0, description="AdamW learning rate. Default: 5e-6 in full mode (LAVIS and the "
                             "paper's appendix), 2e-4 in lora mode (diffusers' LoRA recipes).")
    batch_size: int = Field(3, ge=1, description="Photos per step.")
    mode: Literal["full", "lora"] = Field("full", description="full (the U-Net) or lora (an adapter of a few MB).")
    lora_rank: int = Field(16, ge=1, description="Rank of the LoRA adapter.")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16 (autocast over fp32 weights) or fp32.")
    weight_decay: float = Field(0.01, ge=0)
    resolution: ImageSide = Field(512, description="Side of the square training targets.")
    seed: int = Field(0, ge=0, description="Seed of the noise, timesteps and photo order.")
    device: str = Field(AUTO, description=DEVICE_HELP)

    # The photos that ``images`` names, found and checked once, when the config is made.
    _photos: list[Path] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _default_lr(cls, data):
        return fill_default_lr(data)  # by mode; the resolved rate is what settings() records

    @model_validator(mode="after")
    def _photos_readable(self) -> FinetuneConfig:
        self._photos = find_photos(self.images)
        return self

    def photos(self) -> list[Path]:
        """Every photo named, folders expanded."""
        return list(self._photos)

    def settings(self) -> dict:
        settings = self.model_dump(mode="json", exclude={"out", "device"})
        settings["images"] = [str(path.resolve()) for path in self.photos()]
        settings["model"] = model_location(self.model)
        return settings


def finetune(config: FinetuneConfig, log: Callable[[str], None] = print) -> Path:
    """Train the subject checkpoint and write it to ``config.out``; a finished one is not redone."""
    # Here rather than at the top: they load torch, and the config must stay light to import.
    from blipdiff.models.blip_diffusion.subject_checkpoint import (EMBEDDING_FILE, LORA_FOLDER, LORA_TARGETS,
                                                                   LORA_WEIGHTS, SUBJECT_FILE, UNET_FOLDER)
    from blipdiff.models.training.optimizer import adamw

    out = config.out
    if claim_run_folder(out, config.settings(), record=SUBJECT_FILE, key="settings",
                        other="another subject checkpoint", run="subject checkpoint"):
        log(f"{out} already holds this subject checkpoint")
        return out

    import torch
    from diffusers import DDPMScheduler
    from PIL import Image
    from safetensors.torch import save_file

    from blipdiff.models.blip_diffusion import BlipDiffusionPipeline
    from blipdiff.models.blip_diffusion.image_processor import resize_center_crop, to_signed_tensor

    device = torch.device(resolve_device(config.device))
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        """Seconds of each phase for subject.json (the benchmark reads them); waits for the GPU first."""
        nonlocal clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        seconds[phase], clock = now - clock, now

    torch.manual_seed(config.seed)
    pipe = BlipDiffusionPipeline.from_pretrained(config.model, device=device)
    photos = [Image.open(path).convert("RGB") for path in config.photos()]
    lap("load")
    with torch.no_grad():
        crops = [resize_center_crop(photo, pipe.image_processor.height) for photo in photos]
        embedding = pipe.subject_embedding(crops, config.subject)
        lap("subject embedding")
        targets = torch.stack([to_signed_tensor(resize_center_crop(photo, config.resolution))
                               for photo in photos]).to(device)
        posterior = pipe.vae.encode(targets).latent_dist
        latent_mean, latent_std = posterior.mean, posterior.std
        lap("latent encoding")
    subject_embeds = torch.nn.Parameter(embedding.detach().float().clone())

    unet = pipe.unet
    for model in (pipe.qformer, pipe.text_encoder, pipe.vae):
        model.requires_grad_(False)
    if config.mode == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    optimizer = adamw(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay, undecayed=[subject_embeds],
                      fused=device.type == "cuda")
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    prompt_ids = pipe.tokenizer([f"a {config.subject}"], padding="max_length", truncation=True,
                                max_length=pipe.text_encoder.config.max_position_embeddings - pipe.qformer.num_query_tokens,
                                return_tensors="pt").input_ids.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    unet.train()
    losses, order = [], []
    lap("set-up")
    for step in range(1, config.steps + 1):
        batch = []
        while len(batch) < config.batch_size:
            if not order:
                order = torch.randperm(len(photos), generator=generator).tolist()
            batch.append(order.pop())
        mean, std = latent_mean[batch], latent_std[batch]
        sample = torch.randn(mean.shape, generator=generator).to(device)
        latents = (mean + std * sample) * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(batch),), generator=generator)
        timesteps = timesteps.to(device)
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        target = noise if noise_schedule.config.prediction_type == "epsilon" else \
            noise_schedule.get_velocity(latents, noise, timesteps)
        with autocast:
            context = pipe.text_encoder(prompt_ids.expand(len(batch), -1), subject_embeds.expand(len(batch), -1, -1),
                                        pipe.ctx_begin_pos)
            prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Kept on the device: reading a loss waits for the GPU, so only the logged ones are read now.
        losses.append(loss.detach())
        if step == 1 or step % 10 == 0 or step == config.steps:
            log(f"step {step}/{config.steps}: loss {loss.item():.4f}")
    lap("training")
    losses = torch.stack(losses).tolist()
    unet.eval()

    with atomic_folder(out) as staging:
        save_file({"subject_embeds": subject_embeds.detach().cpu().contiguous()}, staging / EMBEDDING_FILE,
                  metadata={"format": "pt"})
        if config.mode == "lora":
            unet.save_lora_adapter(staging / LORA_FOLDER, weight_name=LORA_WEIGHTS)
        else:
            saved_dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
            (staging / UNET_FOLDER).mkdir()
            unet.save_config(staging / UNET_FOLDER)
            save_file({key: value.detach().to(saved_dtype).cpu().contiguous() for key, value in unet.state_dict().items()},
                      staging / UNET_FOLDER / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        lap("saving")
        record = {"subject": config.subject, "mode": config.mode, "settings": config.settings(),
                  "losses": losses, "train_seconds": seconds["training"], "seconds": seconds}
        # Written last: its presence marks a complete checkpoint.
        (staging / SUBJECT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log(f"{config.steps} steps in {seconds['training']:.1f} s; subject checkpoint -> {out}")
    return out
