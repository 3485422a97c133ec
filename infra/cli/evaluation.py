"""The evaluation commands: score, eval, compare, pin-baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from blipdiff.infra.cli.common import config_from, fail
from blipdiff.models import DEFAULT_CLIP, DEFAULT_DINO
from blipdiff.models.devices import AUTO, DEVICE_HELP, DTYPE_HELP


def score_command(
    dreambench: Annotated[Path, typer.Option(help="DreamBench's dataset folder (DreamBooth's layout).")],
    out: Annotated[Path, typer.Option(help="Folder for scores.parquet and summary.json.")],
    images: Annotated[Path | None, typer.Option(
        help="Generated images: DIR/<subject>/<prompt index>_<image index>.png, or DIR/generations.parquet.")] = None,
    oracle: Annotated[bool, typer.Option("--oracle", help="Score the real photos against each other.")] = False,
    dino: Annotated[str, typer.Option(help="DINO ViT-S/16: hub id or folder.")] = DEFAULT_DINO,
    clip: Annotated[str, typer.Option(help="CLIP ViT-B/32: hub id or folder.")] = DEFAULT_CLIP,
    batch_size: Annotated[int, typer.Option(help="Images per metric-model call.")] = 64,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = AUTO,
) -> None:
    """DreamBench's DINO, CLIP-I and CLIP-T for images made by any method, or the real-photo oracle."""
    from blipdiff.tasks.evaluation.score import ScoreConfig, run_score

    config = config_from(ScoreConfig, dreambench=dreambench, out=out, images=images, oracle=oracle, dino=dino, clip=clip,
                                  batch_size=batch_size, device=device)
    try:
        summary = run_score(config, log=typer.echo)
    except (ValueError, OSError) as error:  # DreamBenchError is a ValueError
        raise fail(str(error)) from error
    means = summary["mean_over_subjects"]
    typer.echo(f"{summary['subjects']} subjects, mean over subjects: "
               + ", ".join(f"{metric} {value:.4f}" for metric, value in means.items()))
    typer.echo(f"scores -> {out / 'scores.parquet'}; summary -> {out / 'summary.json'}")


def eval_command(
    dreambench: Annotated[Path, typer.Option(help="DreamBench's dataset folder (DreamBooth's layout).")],
    out: Annotated[Path, typer.Option(help="Run folder; rerunning the command finishes it.")],
    model: Annotated[str | None, typer.Option(help="Hub id or local checkpoint folder (the official layout).")] = None,
    method: Annotated[str, typer.Option(
        help="blip-diffusion, or dreambooth (fine-tuned per subject on --base, prompts with the identifier).")]
    = "blip-diffusion",
    base: Annotated[str | None, typer.Option(
        help="DreamBooth's base: Stable Diffusion 1.5 (diffusers layout) or a BLIP-Diffusion checkpoint.")] = None,
    dreambooth_steps: Annotated[int, typer.Option(help="DreamBooth's steps per subject.")] = 800,
    dreambooth_lr: Annotated[float, typer.Option(help="DreamBooth's learning rate.")] = 5e-6,
    prior_preservation: Annotated[bool, typer.Option(help="DreamBooth's prior-preservation loss.")] = True,
    num_class_images: Annotated[int, typer.Option(help="DreamBooth's class images per class.")] = 200,
    identifier: Annotated[str, typer.Option(help="DreamBooth's identifier.")] = "sks",
    mode: Annotated[str, typer.Option(help="zero-shot, or finetuned (blipdiff finetune per subject first).")] = "zero-shot",
    subjects: Annotated[str, typer.Option(help="Comma-separated subjects (default: all 30).")] = "",
    prompts: Annotated[int, typer.Option(help="The first N of each subject's 25 prompts.")] = 25,
    images_per_prompt: Annotated[int, typer.Option(help="Images per prompt (the paper: 4).")] = 4,
    steps: Annotated[int, typer.Option(help="PNDM steps (the paper: 100).")] = 100,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.5,
    seed_sets: Annotated[int, typer.Option(help="Repeats with other seeds; mean and spread reported (the paper: 10).")] = 1,
    reference: Annotated[str, typer.Option(
        help="Zero-shot subject embedding: all (mean over the photos), first, or FILE (a photo, or a CSV subject,photo).")]
    = "all",
    resolution: Annotated[int, typer.Option(help="Side of the square images.")] = 512,
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt.")] = "",
    finetune_steps: Annotated[int | None, typer.Option(
        help="Fine-tuning steps for every subject (default: the paper's Table 3).")] = None,
    finetune_mode: Annotated[str, typer.Option(help="full or lora.")] = "full",
    finetune_precision: Annotated[str, typer.Option(help="bf16 or fp32.")] = "bf16",
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = AUTO,
    dino: Annotated[str, typer.Option(help="DINO ViT-S/16: hub id or folder.")] = DEFAULT_DINO,
    clip: Annotated[str, typer.Option(help="CLIP ViT-B/32: hub id or folder.")] = DEFAULT_CLIP,
    dataset: Annotated[str, typer.Option(help="FiftyOne dataset of the catalog (empty: none).")] = "dreambench",
    actors: Annotated[int, typer.Option(help="Generation actors on Ray (one model each; one per GPU, say).")] = 1,
) -> None:
    """Evaluate a model on DreamBench by the paper's protocol: generate, score, report and catalogue. With
    --method dreambooth, DreamBooth on --base, by the same protocol and metrics."""
    from blipdiff.tasks.evaluation.config import EvalConfig

    if (method == "dreambooth") != (base is not None) or (model is None) == (base is None):
        raise fail("give --model (BLIP-Diffusion), or --method dreambooth with --base")
    config = config_from(EvalConfig, model=model or base, method=method, dreambooth_steps=dreambooth_steps,
                                 dreambooth_lr=dreambooth_lr, prior_preservation=prior_preservation,
                                 num_class_images=num_class_images, identifier=identifier, dreambench=dreambench,
                                 out=out, mode=mode, subjects=subjects.split(",") if subjects else [], prompts=prompts,
                                 images_per_prompt=images_per_prompt, steps=steps, guidance=guidance,
                                 seed_sets=seed_sets, reference=reference, resolution=resolution,
                                 negative_prompt=negative_prompt, finetune_steps=finetune_steps,
                                 finetune_mode=finetune_mode, finetune_precision=finetune_precision, dtype=dtype,
                                 dino=dino, clip=clip, dataset=dataset, actors=actors)
    from blipdiff.infra.cli.report import run_with_progress
    from blipdiff.tasks.evaluation.run import check_run_folder, plan, run_eval

    try:
        plan(config)  # refused input in one line, before the progress bar
        check_run_folder(config)
        summary = run_with_progress("subjects", lambda progress: run_eval(config, log=typer.echo, progress=progress))
    except (ValueError, OSError) as error:  # DreamBenchError and CheckpointError are ValueErrors
        raise fail(str(error)) from error
    means = summary["mean_over_subjects"]
    typer.echo(f"{summary['subjects']} subjects, {summary['images']} images, mean over subjects: "
               + ", ".join(f"{metric} {value:.4f}" for metric, value in means.items()))
    typer.echo(f"report -> {out / 'report.md'}")
    if "catalog" in summary:
        typer.echo(f"FiftyOne dataset {summary['catalog']['dataset']!r}: `blipdiff app --dataset {summary['catalog']['dataset']}`")


def compare_command(
    runs: Annotated[list[Path], typer.Argument(help="Evaluation run folders (blipdiff eval --out), two or more.")],
    out: Annotated[Path | None, typer.Option(help="Also write the table to this markdown file.")] = None,
) -> None:
    """Evaluation runs side by side: DINO, CLIP-I, CLIP-T (overall, per subject, per prompt kind) beside
    the papers', and each subject's fine-tuning wall time."""
    from blipdiff.tasks.evaluation.report import compare_runs

    try:
        table = compare_runs(runs)
    except (ValueError, OSError) as error:
        raise fail(str(error)) from error
    typer.echo(table)
    if out is not None:
        from blipdiff.infra.atomic import atomic_path

        with atomic_path(out) as partial:
            partial.write_text(table, encoding="utf-8")


def pin_baseline_command(
    eval_root: Annotated[Path, typer.Option(help="The evaluations' folder (dreambench_eval's eval_root).")],
    run: Annotated[str, typer.Option(help="Run id (its folder's name) to compare every later run with.")],
) -> None:
    """Pin a DreamBench evaluation as the baseline that later comparable runs must not fall below."""
    from blipdiff.tasks.evaluation.history import pin_baseline

    try:
        pin_baseline(eval_root, run)
    except ValueError as error:
        raise fail(str(error)) from error
    typer.echo(f"baseline -> {run} ({eval_root / 'baseline.json'})")
