"""The training commands: finetune, dreambooth, encode-latents, pretrain."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from blipdiff.datasets.configs import EncodeLatentsConfig
from blipdiff.infra.cli.common import config_from, fail, options_from
from blipdiff.models.devices import AUTO, DEVICE_HELP


def finetune_command(
    model: Annotated[str, typer.Option(help="Hub id or local checkpoint folder (the official layout).")],
    images: Annotated[list[Path], typer.Option(help="Photo of the subject, or a folder of them; repeatable.")],
    subject: Annotated[str, typer.Option(help="The subject's category, e.g. dog.")],
    out: Annotated[Path, typer.Option(help="Folder for the subject checkpoint.")],
    steps: Annotated[int, typer.Option(help="Training steps (the paper: 40 to 120).")] = 80,
    lr: Annotated[float | None, typer.Option(
        help="AdamW learning rate. Default: 5e-6 in full mode (LAVIS and the paper's appendix), 2e-4 in lora mode "
             "(diffusers' LoRA recipes).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Photos per step.")] = 3,
    mode: Annotated[str, typer.Option(help="full (the U-Net) or lora (an adapter of a few MB).")] = "full",
    lora_rank: Annotated[int, typer.Option(help="Rank of the LoRA adapter.")] = 16,
    precision: Annotated[str, typer.Option(help="bf16 (autocast over fp32 weights) or fp32.")] = "bf16",
    resolution: Annotated[int, typer.Option(help="Side of the square training targets.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the noise, timesteps and photo order.")] = 0,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = AUTO,
) -> None:
    """Fine-tune BLIP-Diffusion to one subject in a few steps (LAVIS's recipe): a subject checkpoint."""
    from blipdiff.tasks.finetune import FinetuneConfig

    config = config_from(FinetuneConfig, model=model, images=images, subject=subject, out=out, steps=steps, lr=lr,
                                     batch_size=batch_size, mode=mode, lora_rank=lora_rank, precision=precision,
                                     resolution=resolution, seed=seed, device=device)
    from blipdiff.tasks.finetune import finetune

    try:
        finetune(config, log=typer.echo)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise fail(str(error)) from error
    typer.echo(f"use it: blipdiff generate --model {model} --subject-checkpoint {out} --subject {subject} --prompt ...")


def dreambooth_command(
    base: Annotated[str, typer.Option(
        help="Stable Diffusion 1.5 (diffusers layout) or a BLIP-Diffusion checkpoint: hub id or folder.")],
    images: Annotated[list[Path], typer.Option(help="Photo of the subject, or a folder of them; repeatable.")],
    class_noun: Annotated[str, typer.Option(help="The subject's class, e.g. dog.")],
    out: Annotated[Path, typer.Option(help="Folder for the run and its subject checkpoint.")],
    identifier: Annotated[str, typer.Option(help="The rare token that names the subject (one word).")] = "sks",
    steps: Annotated[int, typer.Option(help="Training steps.")] = 800,
    lr: Annotated[float | None, typer.Option(
        help="AdamW learning rate, constant. Default: 5e-6 in full mode, 2e-4 in lora mode.", show_default=False)] = None,
    max_grad_norm: Annotated[float, typer.Option(
        help="Clip the gradients to this total norm, as diffusers' recipe does; 0: no clipping.")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="Subject photos per step and worker (as many class images).")] = 1,
    prior_preservation: Annotated[bool, typer.Option(
        help="The class-specific prior-preservation loss on the base model's own 'a <class>' images.")] = True,
    num_class_images: Annotated[int, typer.Option(help="Class images, generated once and cached.")] = 200,
    prior_loss_weight: Annotated[float, typer.Option(help="λ, the prior loss's weight.")] = 1.0,
    train_text_encoder: Annotated[bool, typer.Option(help="Fine-tune the text encoder too.")] = False,
    mode: Annotated[str, typer.Option(help="full (what training changed) or lora (peft adapters).")] = "full",
    lora_rank: Annotated[int, typer.Option(help="Rank of the LoRA adapters.")] = 16,
    precision: Annotated[str, typer.Option(help="bf16 (autocast over fp32 weights) or fp32.")] = "bf16",
    resolution: Annotated[int, typer.Option(help="Side of the square training images.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the noise, timesteps, photo order and class images.")] = 0,
    class_images: Annotated[Path, typer.Option(help="Cache of class images, shared by runs.")] = Path("class-images"),
    workers: Annotated[int, typer.Option(help="Ray Train workers (gradients averaged).")] = 1,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (a rerun resumes).")] = 100,
) -> None:
    """DreamBooth on Stable Diffusion, the paper's baseline: a subject checkpoint for prompts with the identifier."""
    from blipdiff.tasks.dreambooth.config import DreamBoothConfig
    from blipdiff.tasks.dreambooth.train import run_dreambooth

    config = config_from(DreamBoothConfig, base=base, images=images, class_noun=class_noun, out=out, identifier=identifier,
                                       steps=steps, lr=lr, max_grad_norm=max_grad_norm or None, batch_size=batch_size,
                                       prior_preservation=prior_preservation,
                                       num_class_images=num_class_images, prior_loss_weight=prior_loss_weight,
                                       train_text_encoder=train_text_encoder, mode=mode, lora_rank=lora_rank,
                                       precision=precision, resolution=resolution, seed=seed, class_images=class_images,
                                       workers=workers, checkpoint_every=checkpoint_every)
    try:
        run_dreambooth(config, log=typer.echo)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise fail(str(error)) from error
    typer.echo(f"use it: blipdiff generate --method dreambooth --model {base} --subject-checkpoint {out} "
               f"--subject {class_noun} --prompt 'a {identifier} {class_noun} in the jungle'")


@options_from(EncodeLatentsConfig, "pairs", "model", "resolution", "batch_size", "actors", "gpus_per_actor")
def encode_latents_command(**fields) -> None:
    """Encode every pair's target photo once with the VAE: the cache pre-training reads (a rerun skips what is done)."""
    config = config_from(EncodeLatentsConfig, **fields)
    from blipdiff.datasets.latents import encode_latents
    from blipdiff.infra.cli.report import run_with_progress

    try:
        summary = run_with_progress("encoding", lambda progress: encode_latents(config, progress=progress, log=typer.echo))
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise fail(str(error)) from error
    typer.echo(f"{summary.available} latents -> {summary.folder}")


def pretrain_command(
    pairs: Annotated[list[Path], typer.Option(help="Build folder (blipdiff build --out); repeatable.")],
    init: Annotated[str, typer.Option(help="Checkpoint in the official layout to start from (hub id or folder).")],
    out: Annotated[Path, typer.Option(help="Run folder; rerunning the command resumes it.")],
    reset_from_sd: Annotated[str | None, typer.Option(
        help="Stable Diffusion 1.5 checkpoint whose U-Net, text encoder and VAE replace init's (the paper's start).")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps (the paper: 500K).")] = 500_000,
    batch_size: Annotated[int, typer.Option(help="Samples per worker and micro-batch.")] = 16,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per step.")] = 1,
    workers: Annotated[int, typer.Option(help="Ray Train workers (DDP); global batch = workers x batch x accumulation.")] = 1,
    gpus_per_worker: Annotated[float | None, typer.Option(help="GPUs per worker (default: 1 when Ray sees GPUs).")] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate, constant (the authors').")] = 2e-6,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay, on weight matrices.")] = 0.01,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient-norm clip.")] = 20.0,
    resolution: Annotated[int, typer.Option(help="Side of the square targets.")] = 512,
    precision: Annotated[str, typer.Option(help="bf16 (autocast over fp32 weights) or fp32.")] = "bf16",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations in the backward pass.")] = True,
    subject_dropout: Annotated[float, typer.Option(help="Probability, per sample, that the text alone guides.")] = 0.15,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 10_000,
    keep_checkpoints: Annotated[int, typer.Option(help="Newest checkpoints kept (0: all).")] = 3,
    validate_every: Annotated[int, typer.Option(help="Steps between validation grids (0: none).")] = 5_000,
    validation_pairs: Annotated[int, typer.Option(help="Pairs held out for the validation grids.")] = 4,
    validation_steps: Annotated[int, typer.Option(help="Denoising steps of the validation images.")] = 25,
    log_every: Annotated[int, typer.Option(help="Steps between metrics, TensorBoard and progress updates.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the data order, augmentations, noise and dropout.")] = 0,
) -> None:
    """Stage-2 pre-training of BLIP-Diffusion on built pairs, on Ray Train; rerun to resume."""
    from blipdiff.tasks.pretrain.config import PretrainConfig

    config = config_from(PretrainConfig, pairs=pairs, init=init, out=out, reset_from_sd=reset_from_sd, steps=steps,
                                     batch_size=batch_size, grad_accum=grad_accum, workers=workers,
                                     gpus_per_worker=gpus_per_worker, lr=lr, weight_decay=weight_decay,
                                     max_grad_norm=max_grad_norm, resolution=resolution, precision=precision,
                                     gradient_checkpointing=gradient_checkpointing, subject_dropout=subject_dropout,
                                     checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                                     validate_every=validate_every, validation_pairs=validation_pairs,
                                     validation_steps=validation_steps, log_every=log_every, seed=seed)
    from blipdiff.infra.cli.report import training_progress
    from blipdiff.tasks.pretrain.launch import run_pretrain

    try:
        with training_progress(config.steps) as on_progress:
            summary = run_pretrain(config, log=typer.echo, on_progress=on_progress)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise fail(str(error)) from error
    typer.echo(f"step {summary.step} of {steps}: checkpoint -> {summary.checkpoint}")
    typer.echo(f"metrics -> {out / 'metrics.parquet'}; TensorBoard: tensorboard --logdir {out / 'logs'}")
