"""``blipdiff dreambooth``'s settings and run folder: ``OUT/run.json`` (what decides the weights),
``OUT/checkpoints/step-NNNNNN`` and, at the end, the subject checkpoint (``models.stable_diffusion``'s
layout). The method and its defaults: ``train.py``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from blipdiff.infra.checkpoints import StepCheckpoints
from blipdiff.infra.inputs import Identifier, ImageSide, SubjectText, find_photos, model_location
from blipdiff.models.training.learning_rate import fill_default_lr

CHECKPOINTS = "checkpoints"
SETTINGS_FILE = "run.json"
# What a run's weights do not depend on: changing them resumes the same run.
NOT_TRAJECTORY = {"out", "steps", "checkpoint_every", "workers_for_class_images", "max_failures", "gpus_per_worker",
                  "class_images"}  # the cache's folder: its entries are named by what they hold


class DreamBoothConfig(BaseModel):
    """One ``blipdiff dreambooth`` run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(description="Stable Diffusion 1.5 (diffusers layout) or a BLIP-Diffusion checkpoint: hub id or folder.")
    images: list[Path] = Field(min_length=1, description="Photo of the subject, or a folder of them; repeatable.")
    class_noun: SubjectText = Field(description="The subject's class, e.g. dog.")
    out: Path = Field(description="Folder for the run and its subject checkpoint.")
    identifier: Identifier = Field("sks", description="The rare token that names the subject (one word).")
    steps: int = Field(800, ge=1, description="Training steps.")
    lr: float | None = Field(None, gt=0, description="AdamW learning rate, constant. Default: 5e-6 in full mode, "
                             "2e-4 in lora mode.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradients to this total norm, as diffusers' "
                                        "recipe does (None: no clipping).")
    batch_size: int = Field(1, ge=1, description="Subject photos per step and worker (as many class images).")
    prior_preservation: bool = Field(True, description="The class-specific prior-preservation loss on the base "
                                     "model's own 'a <class>' images.")
    num_class_images: int = Field(200, ge=1, description="Class images, generated once and cached.")
    prior_loss_weight: float = Field(1.0, ge=0, description="λ, the prior loss's weight.")
    train_text_encoder: bool = Field(False, description="Fine-tune the text encoder too.")
    mode: Literal["full", "lora"] = Field("full", description="full (what training changed) or lora (peft adapters).")
    lora_rank: int = Field(16, ge=1, description="Rank of the LoRA adapters.")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16 (autocast over fp32 weights) or fp32.")
    resolution: ImageSide = Field(512, description="Side of the square training images.")
    seed: int = Field(0, ge=0, description="Seed of the noise, timesteps, photo order and class images.")
    class_images: Path = Field(Path("class-images"), validate_default=True,
                               description="Cache of class images, shared by runs.")
    class_steps: int = Field(50, ge=1, description="Denoising steps of a class image.")
    class_guidance: float = Field(7.5, ge=0)
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP: gradients averaged).")
    workers_for_class_images: int = Field(1, ge=1, description="Ray tasks that make the class images.")
    gpus_per_worker: float | None = Field(None, ge=0, description="Default: 1 when the Ray cluster has GPUs, else 0.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints (a rerun resumes).")
    max_failures: int = Field(0, ge=0, description="Worker-group restarts Ray Train may make after a failure.")

    _photos: list[Path] = PrivateAttr(default_factory=list)

    @field_validator("out", "class_images")
    @classmethod
    def _absolute(cls, folder: Path) -> Path:
        return folder.resolve()  # the Ray workers run in other folders

    @field_validator("base")
    @classmethod
    def _absolute_base(cls, base: str) -> str:
        return model_location(base)

    @model_validator(mode="before")
    @classmethod
    def _default_lr(cls, data):
        return fill_default_lr(data)  # by mode; the resolved rate is what settings() records

    @model_validator(mode="after")
    def _inputs(self) -> DreamBoothConfig:
        self._photos = find_photos(self.images)
        if self.prior_preservation:
            require_writable(self.class_images)
        return self

    def photos(self) -> list[Path]:
        return list(self._photos)

    def settings(self) -> dict:
        settings = self.model_dump(mode="json", exclude={"out"})
        settings["images"] = [str(path) for path in self.photos()]
        return settings

    def trajectory(self) -> dict:
        trajectory = {key: value for key, value in self.settings().items() if key not in NOT_TRAJECTORY}
        if trajectory["max_grad_norm"] is None:
            del trajectory["max_grad_norm"]  # as runs recorded it before gradients were clipped: they resume
        return trajectory


def require_writable(folder: Path) -> None:
    """The class-image cache must be a folder this process can write (made if missing)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"class images folder {folder}: not writable ({existing} is not a writable folder)")


def run_checkpoints(out: Path) -> StepCheckpoints:
    """A run's checkpoints: six digits, complete once their state.json is written."""
    return StepCheckpoints(out / CHECKPOINTS, digits=6, marker="state.json")


def checkpoint_name(step: int) -> str:
    return run_checkpoints(Path()).name(step)


def checkpoints(out: Path) -> list[Path]:
    return run_checkpoints(out).complete()
