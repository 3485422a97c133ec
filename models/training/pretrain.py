"""Stage-2 pre-training of BLIP-Diffusion on built pairs: the loop one worker runs, its checkpoints, its
validation images and its logs. Plain PyTorch (DDP when ``torch.distributed`` is initialised); the Ray
Train launcher and the Ray Data stream that feeds it live in ``distributed.py``.

What is trained and how, after the authors (FACTS "Training"): the Q-Former with its query tokens, its
subject-text embeddings and the ViT's ``post_layernorm`` (BLIP-2's ``ln_vision``), the projection, the
CLIP text encoder and the U-Net; the ViT and the VAE stay frozen. The context is the caption text with
the subject embeddings inserted just before its end token; with probability 0.15 per sample the subject
is dropped and the text alone guides (its context is then the text padded to the full length, exactly
what encoding it without a subject gives). Loss: the mean squared error between the U-Net's prediction
and the noise (or the velocity, for a v-prediction schedule) on the checkpoint's DDPM schedule. AdamW
with the authors' settings, bf16 autocast over fp32 weights, gradient clipping, gradient checkpointing.

Run folder: ``RUN/pretrain.json`` (the settings; another configuration is refused),
``RUN/checkpoints/step-NNNNNNN/`` (a model folder in the official layout plus ``training_state/``:
optimiser, step, data position, every rank's random state and the metrics so far; it appears only once
complete), ``RUN/metrics.parquet``, ``RUN/logs/`` (TensorBoard), ``RUN/validation/step-NNNNNNN.png`` and
``RUN/progress.json`` (what the launcher's progress bar shows).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from blipdiff.infra.atomic import TEMP_PREFIX, atomic_folder, atomic_path, write_json_atomic
from blipdiff.infra.inputs import BuildFolder, ImageSide, model_location

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

    pairs: list[BuildFolder] = Field(min_length=1, description="Build folders (blipdiff build --out) to train on.")
    init: str = Field(description="Checkpoint in the official layout to start from (hub id or folder).")
    out: Path = Field(description="Run folder: checkpoints, logs, metrics, validation images.")
    reset_from_sd: str | None = Field(None, description="Replace the U-Net, text encoder and VAE with this Stable "
                                                        "Diffusion 1.5 checkpoint's (the paper's start).")
    steps: int = Field(500_000, ge=1, description="Optimiser steps (the paper: 500K).")
    batch_size: int = Field(16, ge=1, description="Samples per worker and micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per step.")
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP).")
    gpus_per_worker: float | None = Field(None, ge=0, description="Default: 1 when the Ray cluster has GPUs, else 0.")
    lr: float = Field(2e-6, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(20.0, gt=0)
    resolution: ImageSide = Field(512, description="Side of the square targets.")
    precision: Literal["bf16", "fp32"] = "bf16"
    gradient_checkpointing: bool = True
    subject_dropout: float = Field(0.15, ge=0, le=1)
    checkpoint_every: int = Field(10_000, ge=1)
    keep_checkpoints: int = Field(3, ge=0, description="Newest checkpoints kept (0: all).")
    validate_every: int = Field(5_000, ge=0, description="Steps between validation grids (0: none).")
    validation_pairs: int = Field(4, ge=0, description="Pairs held out of training for the validation grids.")
    validation_steps: int = Field(25, ge=1, description="Denoising steps of the validation images.")
    log_every: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
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
    path = config.out / SETTINGS_FILE
    wanted = config.settings()
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != wanted:
            changed = sorted(key for key in existing.keys() | wanted.keys() if existing.get(key) != wanted.get(key))
            raise ValueError(f"{config.out} holds a run with other settings ({', '.join(changed)}): resume it with "
                             "its own settings, or choose another --out")
        return True
    if config.out.exists() and (not config.out.is_dir() or any(config.out.iterdir())):
        raise ValueError(f"{config.out} exists and is not a pre-training run folder; choose another --out")
    return False


def record_settings(config: PretrainConfig) -> None:
    """Written once every input has been checked, so that a refused start leaves no run folder behind."""
    write_json_atomic(config.settings(), config.out / SETTINGS_FILE)


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoints(run: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (a folder is complete once it has its name)."""
    folder = run / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.glob("step-*") if (path / TRAINING_STATE / STATE_FILE).is_file())


def checkpoint_step(folder: Path) -> int:
    return json.loads((folder / TRAINING_STATE / STATE_FILE).read_text())["step"]


# ----------------------------------------------------------------------------------------- the model
def load_training_pipeline(config: PretrainConfig, resume_from: Path | None):
    """The pipeline to train: a checkpoint of this run, or ``init`` (with Stable Diffusion's U-Net, text
    encoder and VAE when ``reset_from_sd``), in float32."""
    import diffusers
    from transformers import CLIPTextConfig

    from blipdiff.models.blip_diffusion import BlipDiffusionPipeline, checkpoint
    from blipdiff.models.blip_diffusion.text_encoder import ContextCLIPTextModel

    if resume_from is not None:
        return BlipDiffusionPipeline.from_pretrained(resume_from)
    pipe = BlipDiffusionPipeline.from_pretrained(config.init)
    if config.reset_from_sd is not None:
        import torch

        root = checkpoint.resolve(config.reset_from_sd, ("unet", "vae", "text_encoder"),
                                  kind="Stable Diffusion checkpoint (unet, vae, text_encoder)")
        text_config = checkpoint.parse_config(
            CLIPTextConfig, checkpoint.read_json(root / "text_encoder" / "config.json"), "text_encoder")
        if text_config.hidden_size != pipe.text_encoder.config.hidden_size:
            raise checkpoint.CheckpointError(
                f"{config.reset_from_sd}: its text encoder's width {text_config.hidden_size} is not the subject "
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


# ------------------------------------------------------------------------------------ the worker's loop
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


def train_worker(config: PretrainConfig, worker: Worker, batches: BatchStream) -> None:
    """Train from the newest complete checkpoint of the run (or the start) to ``config.steps``.

    ``batches(first_step, recipe)`` yields this worker's micro-batches (``config.batch_size`` samples
    each) from ``first_step`` on, in order.
    """
    import torch
    import torch.distributed as dist

    from blipdiff.datasets.training_pairs import SampleRecipe
    from blipdiff.models.training.objective import PretrainObjective
    from blipdiff.models.training.optimizer import adamw

    distributed = dist.is_available() and dist.is_initialized()
    device = torch.device(worker.device)
    run = config.out
    if worker.leader:
        for leftover in (run / CHECKPOINTS).glob(f"{TEMP_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
    saved = checkpoints(run)
    resume_from = saved[-1] if saved else None
    torch.manual_seed(config.seed * 1_000 + worker.rank)
    pipe = load_training_pipeline(config, resume_from).to(device)
    pipe.set_progress_bar_config(disable=True)
    objective = PretrainObjective(pipe)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(objective)
    model = objective
    if distributed and worker.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    trained = [parameter for parameter in objective.parameters() if parameter.requires_grad]
    optimizer = adamw(trained, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps,
                      fused=device.type == "cuda")
    step, metrics, train_seconds = 0, [], 0.0
    if resume_from is not None:
        state_folder = resume_from / TRAINING_STATE
        state = json.loads((state_folder / STATE_FILE).read_text())
        step, train_seconds = state["step"], state["train_seconds"]
        optimizer.load_state_dict(torch.load(state_folder / "optimizer.pt", map_location=device, weights_only=True))
        random_state = torch.load(state_folder / f"rng-rank{worker.rank}.pt", weights_only=True)
        torch.set_rng_state(random_state["cpu"])
        if device.type == "cuda" and "cuda" in random_state:
            torch.cuda.set_rng_state(random_state["cuda"], device)
        metrics = _read_metrics(state_folder / METRICS_FILE)
    recipe = SampleRecipe(
        seed=config.seed, image_size=pipe.image_processor.height, mean=tuple(pipe.image_processor.mean),
        std=tuple(pipe.image_processor.std), scaling_factor=float(pipe.vae.config.scaling_factor),
        num_train_timesteps=int(objective.schedule.config.num_train_timesteps), subject_dropout=config.subject_dropout)
    log = _Log(config, worker, metrics, train_seconds)
    stream = batches(step, recipe)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    model.train()
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    log.start_clock()
    while step < config.steps:
        total = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            inputs = batch_inputs(pipe, next(stream), device)
            last = micro == config.grad_accum - 1
            # Gradients are averaged across workers once per step, on the last micro-batch.
            sync = contextlib.nullcontext() if last or model is objective else model.no_sync()
            with sync:
                with autocast:
                    loss = model(**inputs) / config.grad_accum
                loss.backward()
            total += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        pending.append((step, total, grad_norm.detach()))
        final = step == config.steps
        checkpointing = step % config.checkpoint_every == 0 or final
        if step % config.log_every == 0 or checkpointing:
            log.flush(pending, optimizer.param_groups[0]["lr"], distributed)
            pending = []
        if checkpointing:
            log.stop_clock()
            _write_checkpoint(config, worker, pipe, optimizer, step, log, distributed)
            log.start_clock()
        if config.validate_every and step % config.validate_every == 0 and worker.leader:
            log.stop_clock()
            validation_grid(config, pipe, objective, step, log)
            log.start_clock()
    if distributed:
        dist.barrier()
    log.close()


def _read_metrics(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist() if path.is_file() else []


class _Log:
    """Rank 0's record of the run: metrics.parquet, TensorBoard, progress.json; every rank takes part in
    averaging the losses. Its clock counts training only, not checkpoints and validation."""

    def __init__(self, config: PretrainConfig, worker: Worker, metrics: list[dict], train_seconds: float):
        self.config, self.worker, self.metrics = config, worker, metrics
        self.train_seconds = train_seconds
        self.interval_seconds, self.interval_steps = 0.0, 0
        self.clock = 0.0
        self.writer = None
        if worker.leader:
            from torch.utils.tensorboard import SummaryWriter

            # Events past the resumed step belong to the lost stretch of a killed run: TensorBoard drops them.
            step = metrics[-1]["step"] if metrics else 0
            self.writer = SummaryWriter(str(config.out / "logs"), purge_step=step + 1)

    def start_clock(self) -> None:
        self._wait_for_device()
        self.clock = time.perf_counter()

    def stop_clock(self) -> None:
        self._wait_for_device()
        elapsed = time.perf_counter() - self.clock
        self.train_seconds += elapsed
        self.interval_seconds += elapsed

    def _wait_for_device(self) -> None:
        import torch

        if torch.device(self.worker.device).type == "cuda":
            torch.cuda.synchronize(self.worker.device)

    def flush(self, pending: list, lr: float, distributed: bool) -> None:
        """Average the pending steps' losses over the workers and record them (reading them waits for
        the device, so it happens every few steps only)."""
        import torch
        import torch.distributed as dist

        losses = torch.stack([loss for _, loss, _ in pending])
        if distributed:
            dist.all_reduce(losses)
            losses /= self.worker.world
        losses, norms = losses.tolist(), torch.stack([norm for _, _, norm in pending]).tolist()
        self.stop_clock()
        self.interval_steps += len(pending)
        rate = self.interval_steps * self.config.global_batch / max(self.interval_seconds, 1e-9)
        self.interval_seconds, self.interval_steps = 0.0, 0
        if self.worker.leader:
            self._record(pending, losses, norms, lr, rate)
        self.start_clock()

    def _record(self, pending: list, losses: list[float], norms: list[float], lr: float, rate: float) -> None:
        import torch

        device = torch.device(self.worker.device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        for (step, _, _), loss, norm in zip(pending, losses, norms):
            self.metrics.append({"step": step, "loss": loss, "grad_norm": norm, "lr": lr, "samples_per_s": rate,
                                 "train_seconds": self.train_seconds, "peak_gpu_gib": peak})
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/grad_norm", norm, step)
            self.writer.add_scalar("train/lr", lr, step)
        step = pending[-1][0]
        self.writer.add_scalar("train/samples_per_s", rate, step)
        self.writer.flush()
        self.write_metrics(self.config.out / METRICS_FILE)
        write_json_atomic({"step": step, "steps": self.config.steps, "loss": losses[-1], "samples_per_s": rate,
                           "eta_seconds": (self.config.steps - step) * self.config.global_batch / rate},
                          self.config.out / PROGRESS_FILE)

    def write_metrics(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with atomic_path(path) as temp:
            pq.write_table(pa.Table.from_pylist(self.metrics), temp)

    def image(self, tag: str, pixels, step: int) -> None:
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _write_checkpoint(config: PretrainConfig, worker: Worker, pipe, optimizer, step: int, log: _Log,
                      distributed: bool) -> None:
    """Every rank hands its random state to rank 0, which writes the model, the training state and the
    metrics into a folder that takes its final name only once complete, then drops the oldest beyond
    ``keep_checkpoints``."""
    import torch
    import torch.distributed as dist

    device = torch.device(worker.device)
    random_state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        random_state["cuda"] = torch.cuda.get_rng_state(device)
    states = [random_state]
    if distributed and worker.world > 1:
        states = [None] * worker.world
        dist.all_gather_object(states, random_state)
    if worker.leader:
        target = config.out / CHECKPOINTS / checkpoint_name(step)
        with atomic_folder(target) as staging:
            pipe.write_layout(staging)
            state_folder = staging / TRAINING_STATE
            state_folder.mkdir()
            torch.save(optimizer.state_dict(), state_folder / "optimizer.pt")
            for rank, state in enumerate(states):
                torch.save({key: value.cpu() for key, value in state.items()}, state_folder / f"rng-rank{rank}.pt")
            log.write_metrics(state_folder / METRICS_FILE)
            (state_folder / STATE_FILE).write_text(json.dumps({
                "step": step, "next_position": step * config.global_batch, "samples_seen": step * config.global_batch,
                "train_seconds": log.train_seconds, "workers": worker.world, "settings": config.settings()},
                indent=2) + "\n")
        if config.keep_checkpoints:
            for old in checkpoints(config.out)[:-config.keep_checkpoints]:
                # Renamed first, so that a kill while deleting never leaves a half-deleted "complete" one.
                doomed = old.with_name(f"{TEMP_PREFIX}{old.name}.deleted")
                old.rename(doomed)
                shutil.rmtree(doomed)
    if distributed and worker.world > 1:
        dist.barrier()


def validation_grid(config: PretrainConfig, pipe, objective, step: int, log: _Log) -> Path | None:
    """Images of the held-out pairs' subjects in the validation prompts at a fixed seed, one row per pair
    (its input photo, then one image per prompt), as ``RUN/validation/step-NNNNNNN.png`` and in TensorBoard."""
    import numpy as np
    import torch
    from PIL import Image

    from blipdiff.datasets.training_pairs import read_records

    held = config.out / RECORDS / "validation.parquet"
    records = read_records(held) if held.is_file() else []
    if not records:
        return None
    side = config.resolution
    objective.eval()
    rows = []
    try:
        with torch.autocast(torch.device(log.worker.device).type, dtype=torch.bfloat16,
                            enabled=config.precision == "bf16"):
            for record in records:
                with Image.open(record["input_path"]) as photo:
                    reference = photo.convert("RGB")
                images = pipe(list(VALIDATION_PROMPTS), reference, record["label"], guidance_scale=7.5,
                              height=side, width=side, num_inference_steps=config.validation_steps,
                              generator=[torch.Generator().manual_seed(config.seed + k)
                                         for k in range(len(VALIDATION_PROMPTS))]).images
                rows.append([reference.resize((side, side), Image.Resampling.BICUBIC), *images])
    finally:
        objective.train()
    grid = np.concatenate([np.concatenate([np.asarray(image) for image in row], axis=1) for row in rows], axis=0)
    path = config.out / "validation" / f"{checkpoint_name(step)}.png"
    with atomic_path(path) as temp:
        Image.fromarray(grid).save(temp, format="PNG")
    log.image("validation", grid, step)
    return path
