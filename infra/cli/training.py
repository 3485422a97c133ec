"""The training commands: finetune, dreambooth, encode-latents, pretrain."""

from __future__ import annotations

import typer
from blipdiff.datasets.configs import EncodeLatentsConfig
from blipdiff.infra.cli.common import Opt, config_from, fail, options_from
from blipdiff.tasks.dreambooth.config import DreamBoothConfig
from blipdiff.tasks.finetune import FinetuneConfig
from blipdiff.tasks.pretrain.config import PretrainConfig


@options_from(FinetuneConfig, "model", "images", "subject", "out", "steps", "lr", "batch_size", "mode", "lora_rank",
              "precision", "resolution", "seed", "device")
def finetune_command(**fields) -> None:
    """Fine-tune BLIP-Diffusion to one subject in a few steps (LAVIS's recipe): a subject checkpoint."""
    config = config_from(FinetuneConfig, **fields)
    from blipdiff.tasks.finetune import finetune

    try:
        finetune(config, log=typer.echo)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise fail(str(error)) from error
    typer.echo(f"use it: blipdiff generate --model {fields['model']} --subject-checkpoint {fields['out']} "
               f"--subject {fields['subject']} --prompt ...")


# The config's max_grad_norm is None for no clipping; the command takes 0 for it, an option's value of its own.
@options_from(DreamBoothConfig, "base", "images", "class_noun", "out", "identifier", "steps", "lr",
              Opt("max_grad_norm", type=float, help="Clip the gradients to this total norm, as diffusers' recipe "
                  "does; 0: no clipping."),
              "batch_size", "prior_preservation", "num_class_images", "prior_loss_weight", "train_text_encoder", "mode",
              "lora_rank", "precision", "resolution", "seed", "class_images", "workers", "checkpoint_every")
def dreambooth_command(**fields) -> None:
    """DreamBooth on Stable Diffusion, the paper's baseline: a subject checkpoint for prompts with the identifier."""
    from blipdiff.tasks.dreambooth.train import run_dreambooth

    config = config_from(DreamBoothConfig, **{**fields, "max_grad_norm": fields["max_grad_norm"] or None})
    try:
        run_dreambooth(config, log=typer.echo)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise fail(str(error)) from error
    typer.echo(f"use it: blipdiff generate --method dreambooth --model {fields['base']} --subject-checkpoint "
               f"{fields['out']} --subject {fields['class_noun']} --prompt "
               f"'a {fields['identifier']} {fields['class_noun']} in the jungle'")


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


@options_from(PretrainConfig, "pairs", "init", "out", "reset_from_sd", "steps", "batch_size", "grad_accum", "workers",
              "gpus_per_worker", "lr", "weight_decay", "max_grad_norm", "resolution", "precision",
              "gradient_checkpointing", "subject_dropout", "checkpoint_every", "keep_checkpoints", "validate_every",
              "validation_pairs", "validation_steps", "log_every", "seed")
def pretrain_command(**fields) -> None:
    """Stage-2 pre-training of BLIP-Diffusion on built pairs, on Ray Train; rerun to resume."""
    config = config_from(PretrainConfig, **fields)
    from blipdiff.infra.cli.report import training_progress
    from blipdiff.tasks.pretrain.launch import run_pretrain

    try:
        with training_progress(config.steps) as on_progress:
            summary = run_pretrain(config, log=typer.echo, on_progress=on_progress)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise fail(str(error)) from error
    out = fields["out"]
    typer.echo(f"step {summary.step} of {fields['steps']}: checkpoint -> {summary.checkpoint}")
    typer.echo(f"metrics -> {out / 'metrics.parquet'}; TensorBoard: tensorboard --logdir {out / 'logs'}")
