"""The evaluation commands: score, eval, compare, pin-baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from blipdiff.infra.cli.common import Opt, config_from, fail, options_from
from blipdiff.tasks.evaluation.config import EvalConfig
from blipdiff.tasks.evaluation.score import ScoreConfig


@options_from(ScoreConfig, "dreambench", "out", "images", Opt("oracle", "--oracle"), "dino", "clip", "batch_size",
              "device")
def score_command(**fields) -> None:
    """DreamBench's DINO, CLIP-I and CLIP-T for images made by any method, or the real-photo oracle."""
    from blipdiff.tasks.evaluation.score import run_score

    config = config_from(ScoreConfig, **fields)
    try:
        summary = run_score(config, log=typer.echo)
    except (ValueError, OSError) as error:  # DreamBenchError is a ValueError
        raise fail(str(error)) from error
    means = summary["mean_over_subjects"]
    typer.echo(f"{summary['subjects']} subjects, mean over subjects: "
               + ", ".join(f"{metric} {value:.4f}" for metric, value in means.items()))
    out = fields["out"]
    typer.echo(f"scores -> {out / 'scores.parquet'}; summary -> {out / 'summary.json'}")


# The command takes --model, or --method dreambooth with --base (its own option: the config's model is the base
# then), so that --model is not required here though the config's model is; --subjects is one comma-separated
# string, a format of the command's own.
@options_from(EvalConfig, "dreambench", "out", Opt("model", type=str | None, default=None), "method",
              Opt("base", type=str | None, default=None, help="DreamBooth's base: Stable Diffusion 1.5 (diffusers "
                  "layout) or a BLIP-Diffusion checkpoint."),
              "dreambooth_steps", "dreambooth_lr", "prior_preservation", "num_class_images", "identifier", "mode",
              Opt("subjects", type=str, default="", help="Comma-separated subjects (default: all 30)."), "prompts",
              "images_per_prompt", "steps", "guidance", "seed_sets", "reference", "resolution", "negative_prompt",
              "finetune_steps", "finetune_mode", "finetune_precision", "dtype", "dino", "clip", "dataset", "actors")
def eval_command(**fields) -> None:
    """Evaluate a model on DreamBench by the paper's protocol: generate, score, report and catalogue. With
    --method dreambooth, DreamBooth on --base, by the same protocol and metrics."""
    model, base, subjects = fields.pop("model"), fields.pop("base"), fields.pop("subjects")
    if (fields["method"] == "dreambooth") != (base is not None) or (model is None) == (base is None):
        raise fail("give --model (BLIP-Diffusion), or --method dreambooth with --base")
    config = config_from(EvalConfig, **fields, model=model or base, subjects=subjects.split(",") if subjects else [])
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
    typer.echo(f"report -> {fields['out'] / 'report.md'}")
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
