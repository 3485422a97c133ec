"""Stage-2 pre-training of BLIP-Diffusion on built pairs: its settings, run folder and checkpoints. The loop
one worker runs is ``worker.py`` (plain PyTorch, DDP when ``torch.distributed`` is initialised); the Ray
Train launch and the Ray Data stream that feeds it are ``launch.py``.

Run folder: ``RUN/pretrain.json`` (the settings; another configuration is refused),
``RUN/checkpoints/step-NNNNNNN/`` (a model folder in the official layout plus ``training_state/``:
optimiser, step, data position, every rank's random state and the metrics so far; it appears only once
complete), ``RUN/metrics.parquet``, ``RUN/logs/`` (TensorBoard), ``RUN/validation/step-NNNNNNN.png`` and
``RUN/progress.json`` (what the launcher's progress bar shows).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from blipdiff.infra.checkpoints import StepCheckpoints
from blipdiff.infra.inputs import BuildFolder, ImageSide, model_location
from blipdiff.infra.run_folder import claim_run_folder, record_run_folder

SETTINGS_FILE = "pretrain.json"
CHECKPOINTS = "checkpoints"
TRAINING_STATE = "training_state"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.parquet"
PROGRESS_FILE = "progress.json"
RECORDS = "records"
VALIDATION_PROMPTS = ("swimming in the ocean", "on a wooden table in a sunlit kitchen", "in the snow at night")
# Settings that change where, how often or how visibly the run works, but not the weights it reaches.
NOT_TRAJECTORY = {"out", "steps", "checkpoint_every", "keep_checkpoints", "validate_every", "validation_steps",
                  "log_every", "max_failures", "gpus_per_worker", "latent_actors"}


class PretrainConfig(BaseModel):
    """One ``blipdiff pretrain`` run; the Prefect flow's form and the CLI's options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pairs: list[BuildFolder] = Field(min_length=1, description="Build folder (blipdiff build --out) to train on; "
                                     "repeatable.")
    init: str = Field(description="Checkpoint in the official layout to start from (hub id or folder).")
    out: Path = Field(description="Run folder (checkpoints, logs, metrics, validation images); rerunning the "
                      "command resumes it.")
    reset_from_sd: str | None = Field(None, description="Replace the U-Net, text encoder and VAE with this Stable "
                                                        "Diffusion 1.5 checkpoint's (the paper's start).")
    steps: int = Field(500_000, ge=1, description="Optimiser steps (the paper: 500K).")
    batch_size: int = Field(16, ge=1, description="Samples per worker and micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per step.")
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP); global batch = workers x batch x accumulation.")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per worker (default: 1 when the Ray cluster "
                                          "has GPUs, else 0).")
    lr: float = Field(2e-6, gt=0, description="AdamW learning rate, constant (the authors').")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay, on weight matrices.")
    max_grad_norm: float = Field(20.0, gt=0, description="Gradient-norm clip.")
    resolution: ImageSide = Field(512, description="Side of the square targets.")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16 (autocast over fp32 weights) or fp32.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in the backward pass.")
    subject_dropout: float = Field(0.15, ge=0, le=1, description="Probability, per sample, that the text alone guides.")
    checkpoint_every: int = Field(10_000, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(3, ge=0, description="Newest checkpoints kept (0: all).")
    validate_every: int = Field(5_000, ge=0, description="Steps between validation grids (0: none).")
    validation_pairs: int = Field(4, ge=0, description="Pairs held out of training for the validation grids.")
    validation_steps: int = Field(25, ge=1, description="Denoising steps of the validation images.")
    log_every: int = Field(10, ge=1, description="Steps between metrics, TensorBoard and progress updates.")
    seed: int = Field(0, ge=0, description="Seed of the data order, augmentations, noise and dropout.")
    max_failures: int = Field(3, ge=0, description="Restarts of failed workers from the last checkpoint.")
    latent_actors: int = Field(1, ge=1, description="VAE actors encoding the target latents.")

    # Absolute, since the workers run elsewhere (other folders, other nodes that see the same paths).
    @field_validator("out")
    @classmethod
    def _absolute_out(cls, folder: Path) -> Path:
        return folder.expanduser().resolve()

    @field_validator("init", "reset_from_sd")
    @classmethod
    def _absolute_model(cls, model: str | None) -> str | None:
        return None if model is None else model_location(model)

    @property
    def global_batch(self) -> int:
        return self.workers * self.batch_size * self.grad_accum

    def settings(self) -> dict:
        return self.model_dump(mode="json", exclude=NOT_TRAJECTORY)

    def latent_model(self) -> str:
        """The checkpoint whose VAE encodes the targets."""
        return self.reset_from_sd or self.init


def check_run_folder(config: PretrainConfig) -> bool:
    """Whether ``config.out`` already records these settings (False: a new run). A folder that holds
    another configuration, or anything but a run, is refused."""
    return claim_run_folder(config.out, config.settings(), record=SETTINGS_FILE, other="a run", run="pre-training run",
                            advice="resume it with its own settings, or choose another --out")


def record_settings(config: PretrainConfig) -> None:
    """Written once every input has been checked, so that a refused start leaves no run folder behind."""
    record_run_folder(config.out, config.settings(), SETTINGS_FILE)


def run_checkpoints(run: Path) -> StepCheckpoints:
    """A run's checkpoints: seven digits, complete once their training state is written."""
    return StepCheckpoints(run / CHECKPOINTS, digits=7, marker=f"{TRAINING_STATE}/{STATE_FILE}")


def checkpoint_name(step: int) -> str:
    return run_checkpoints(Path()).name(step)


def checkpoints(run: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (a folder is complete once it has its name)."""
    return run_checkpoints(run).complete()


def checkpoint_step(folder: Path) -> int:
    return json.loads((folder / TRAINING_STATE / STATE_FILE).read_text())["step"]


@dataclass
class Worker:
    """Where this process sits in the run."""

    rank: int
    world: int
    device: object  # torch.device

    @property
    def leader(self) -> bool:
        return self.rank == 0


BatchStream = Callable[[int, object], Iterator[dict]]
