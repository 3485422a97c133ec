"""The loop one pre-training worker runs: from the newest complete checkpoint of the run (or the start) to
the last step, with its checkpoints, validation images and logs (the run and its folder: ``config.py``).

What is trained and how, after the authors (FACTS "Training"): the Q-Former with its query tokens, its
subject-text embeddings and the ViT's ``post_layernorm`` (BLIP-2's ``ln_vision``), the projection, the
CLIP text encoder and the U-Net; the ViT and the VAE stay frozen. The context is the caption text with
the subject embeddings inserted just before its end token; with probability 0.15 per sample the subject
is dropped and the text alone guides (its context is then the text padded to the full length, exactly
what encoding it without a subject gives). Loss: the mean squared error between the U-Net's prediction
and the noise (or the velocity, for a v-prediction schedule) on the checkpoint's DDPM schedule. AdamW
with the authors' settings, bf16 autocast over fp32 weights, gradient clipping, gradient checkpointing.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from blipdiff.infra.atomic import atomic_path, write_json_atomic
from blipdiff.infra.checkpoints import gather_rng, restore_rng, save_rng
from blipdiff.models.training.pretrain_model import batch_inputs, enable_gradient_checkpointing, load_training_pipeline
from blipdiff.tasks.pretrain.config import (METRICS_FILE, PROGRESS_FILE, RECORDS, STATE_FILE, TRAINING_STATE,
                                            VALIDATION_PROMPTS, BatchStream, PretrainConfig, Worker, checkpoint_name,
                                            run_checkpoints)


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
    saved = run_checkpoints(config.out)
    if worker.leader:
        saved.clear_leftovers()
    resume_from = saved.newest()
    torch.manual_seed(config.seed * 1_000 + worker.rank)
    pipe = load_training_pipeline(config.init, config.reset_from_sd, resume_from).to(device)
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
        restore_rng(state_folder, worker.rank, device)
        metrics = _read_metrics(state_folder / METRICS_FILE)
    recipe = SampleRecipe(
        seed=config.seed, image_size=pipe.image_processor.height, mean=tuple(pipe.image_processor.mean),
        std=tuple(pipe.image_processor.std), scaling_factor=float(pipe.vae.config.scaling_factor),
        num_train_timesteps=int(objective.schedule.config.num_train_timesteps), subject_dropout=config.subject_dropout)
    log = TrainingLog(config, worker, metrics, train_seconds)
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


class TrainingLog:
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


def _write_checkpoint(config: PretrainConfig, worker: Worker, pipe, optimizer, step: int, log: TrainingLog,
                      distributed: bool) -> None:
    """Every rank hands its random state to rank 0, which writes the model, the training state and the
    metrics into a folder that takes its final name only once complete, then drops the oldest beyond
    ``keep_checkpoints``."""
    import torch
    import torch.distributed as dist

    states = gather_rng(worker.device, worker.world)
    if worker.leader:
        saved = run_checkpoints(config.out)
        with saved.writing(step) as staging:
            pipe.write_layout(staging)
            state_folder = staging / TRAINING_STATE
            state_folder.mkdir()
            torch.save(optimizer.state_dict(), state_folder / "optimizer.pt")
            save_rng(state_folder, states)
            log.write_metrics(state_folder / METRICS_FILE)
            (state_folder / STATE_FILE).write_text(json.dumps({
                "step": step, "next_position": step * config.global_batch, "samples_seen": step * config.global_batch,
                "train_seconds": log.train_seconds, "workers": worker.world, "settings": config.settings()},
                indent=2) + "\n")
        saved.prune(config.keep_checkpoints)
    if distributed and worker.world > 1:
        dist.barrier()


def validation_grid(config: PretrainConfig, pipe, objective, step: int, log: TrainingLog) -> Path | None:
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
