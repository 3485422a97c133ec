"""The training losses: pre-training's, over the modules that train (what DDP wraps), and DreamBooth's.

In pre-training the ViT stays frozen (its ``post_layernorm``, BLIP-2's ``ln_vision``, trains) and in inference mode;
the VAE is not here at all, since the targets arrive as cached latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from torch import nn


class PretrainObjective(nn.Module):
    """The trained modules, and the loss of one batch (what DDP wraps)."""

    def __init__(self, pipe):
        super().__init__()
        self.qformer, self.text_encoder, self.unet = pipe.qformer, pipe.text_encoder, pipe.unet
        self.schedule = DDPMScheduler.from_config(pipe.scheduler.config)
        self.pad_token_id = pipe.tokenizer.pad_token_id
        self.qformer.visual_encoder.requires_grad_(False)
        self.qformer.visual_encoder.post_layernorm.requires_grad_(True)
        # Only the queries leave the Q-Former: the text feed-forward of its last layer reaches nothing.
        last = self.qformer.encoder.layer[-1]
        last.intermediate.requires_grad_(False)
        last.output.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen ViT stays in inference mode.
        self.qformer.visual_encoder.eval()
        return self

    def context(self, pixel_values, subject_ids, subject_mask, text_ids, insert_at, keep_subject) -> torch.Tensor:
        """The U-Net's context: each text with its subject inserted at ``insert_at``, or, where
        ``keep_subject`` is False, the text alone padded to the full length."""
        subject = self.qformer(pixel_values, subject_ids, subject_mask)
        # A dropped subject: pad tokens appended after the text instead, i.e. the text alone padded
        # to the full length. The Q-Former still runs, so that DDP sees every parameter in every step.
        pad = self.text_encoder.text_model.embeddings.token_embedding(
            torch.full(subject.shape[:2], self.pad_token_id, device=subject.device))
        keep = keep_subject[:, None, None]
        subject = torch.where(keep, subject, pad.to(subject.dtype))
        insert_at = torch.where(keep_subject, insert_at, torch.full_like(insert_at, text_ids.shape[1]))
        return self.text_encoder(text_ids, subject, insert_at)

    def forward(self, pixel_values, subject_ids, subject_mask, text_ids, insert_at, keep_subject, latents,
                noise, timesteps) -> torch.Tensor:
        """Mean squared error of the predicted noise (or velocity) for the batch."""
        context = self.context(pixel_values, subject_ids, subject_mask, text_ids, insert_at, keep_subject)
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        target = noise if self.schedule.config.prediction_type == "epsilon" else \
            self.schedule.get_velocity(latents, noise, timesteps)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        return torch.nn.functional.mse_loss(prediction.float(), target.float())


@dataclass
class LossParts:
    total: object  # torch.Tensor
    instance: object
    prior: object | None


def dreambooth_loss(unet, latents, noise, timesteps, context, instances: int, prior_loss_weight: float,
                    schedule) -> LossParts:
    """One batch of ``instances`` subject samples followed (with prior preservation) by as many class
    samples: the instance MSE of the predicted noise plus ``prior_loss_weight`` times the class MSE."""
    noisy = schedule.add_noise(latents, noise, timesteps)
    target = noise if schedule.config.prediction_type == "epsilon" else schedule.get_velocity(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample.float()
    instance = nn.functional.mse_loss(prediction[:instances], target[:instances].float())
    if prediction.shape[0] == instances:
        return LossParts(instance, instance, None)
    prior = nn.functional.mse_loss(prediction[instances:], target[instances:].float())
    return LossParts(instance + prior_loss_weight * prior, instance, prior)
