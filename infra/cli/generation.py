"""The generation commands: generate, edit, interpolate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from blipdiff.infra.cli.common import config_from, fail, numbers
from blipdiff.models.devices import AUTO, DEVICE_HELP, DTYPE_HELP


def generate_command(
    model: Annotated[str, typer.Option(help="Hub id or local checkpoint folder (the official layout).")],
    subject: Annotated[str, typer.Option(help="The subject's category, e.g. dog.")],
    prompt: Annotated[list[str], typer.Option(help="What to generate, e.g. 'in the jungle'; repeatable.")],
    out: Annotated[Path, typer.Option(help="Folder for the PNGs and generations.parquet.")],
    image: Annotated[
        list[Path] | None, typer.Option(help="Reference photo of the subject; repeat to average several.")] = None,
    subject_checkpoint: Annotated[
        Path | None, typer.Option(help="A `blipdiff finetune` output, instead of reference photos.")] = None,
    target_subject: Annotated[str | None, typer.Option(help="Category written into the prompt (default: --subject).")] = None,
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt (classifier-free guidance).")] = "",
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
    guidance: Annotated[float, typer.Option(help="Guidance scale (1 or less: no guidance).")] = 7.5,
    seed: Annotated[int, typer.Option(help="Image k of each prompt uses seed + k.")] = 0,
    num_images: Annotated[int, typer.Option(help="Images per prompt.")] = 1,
    height: Annotated[int, typer.Option(help="Image height, a multiple of 8.")] = 512,
    width: Annotated[int, typer.Option(help="Image width, a multiple of 8.")] = 512,
    scheduler: Annotated[str, typer.Option(help="pndm, ddim or dpm.")] = "pndm",
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = AUTO,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = AUTO,
    image_subject: Annotated[list[str] | None, typer.Option(
        help="Each --image's category, to blend different subjects (default: --subject).")] = None,
    weights: Annotated[str | None, typer.Option(help="Each --image's weight in the mean, e.g. 0.3,0.7.")] = None,
    control: Annotated[list[Path] | None, typer.Option(
        help="Control image for a ControlNet (edges, depth, pose, ...); repeat with one --controlnet each.")] = None,
    control_type: Annotated[list[str] | None, typer.Option(
        help="canny (edges computed from --control) or image (as given); one, or one per --control.")] = None,
    controlnet: Annotated[list[str] | None, typer.Option(
        help="Stable Diffusion 1.5 ControlNet (hub id or folder) per --control; default: the checkpoint's own.")] = None,
    control_scale: Annotated[list[float] | None, typer.Option(
        help="ControlNet residual scale; one, or one per --control (0 switches one off).")] = None,
    method: Annotated[str, typer.Option(
        help="blip-diffusion, or dreambooth: --model is the base, --subject-checkpoint a `blipdiff dreambooth` "
             "output, and each prompt names the subject by its identifier.")] = "blip-diffusion",
) -> None:
    """Subject-driven generation with BLIP-Diffusion: PNGs plus a sidecar that makes each again exactly.
    With --control, under the structure of the control images (ControlNet); with --weights, a blend."""
    from blipdiff.tasks.generate import GenerateConfig, generate_images

    config = config_from(GenerateConfig, model=model, images=image or [], subject_checkpoint=subject_checkpoint,
                                     subject=subject, target_subject=target_subject, prompts=prompt, out=out,
                                     negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=seed,
                                     num_images=num_images, height=height, width=width, scheduler=scheduler,
                                     dtype=dtype, device=device, image_subjects=image_subject or [],
                                     weights=numbers(weights, "--weights"), controls=control or [],
                                     control_types=control_type or ["image"], controlnets=controlnet or [],
                                     control_scales=control_scale or [1.0], method=method)
    try:
        manifest = generate_images(config, log=typer.echo)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise fail(str(error)) from error
    typer.echo(f"{len(config.prompts) * num_images} images -> {out}; settings and seeds -> {manifest}")


def edit_command(
    model: Annotated[str, typer.Option(help="Hub id or local checkpoint folder (the official layout).")],
    edit_token: Annotated[str, typer.Option(help="The word of the source whose region the subject takes, e.g. cat.")],
    image: Annotated[list[Path], typer.Option(help="Reference photo of the subject; repeat to average several.")],
    subject: Annotated[str, typer.Option(help="The subject's category, e.g. dog.")],
    prompt: Annotated[str, typer.Option(help="The edited picture's text after the subject, e.g. 'sitting on a sofa'.")],
    out: Annotated[Path, typer.Option(help="Folder for edited.png, source.png, mask.png and edit.json.")],
    source_prompt: Annotated[str | None, typer.Option(
        help="Generate the source picture from this text (with --seed); it must contain --edit-token.")] = None,
    source_image: Annotated[Path | None, typer.Option(
        help="Edit this photo instead (DDIM inversion), described as 'a <edit-token> <prompt>'.")] = None,
    weights: Annotated[str | None, typer.Option(help="Each --image's weight in the mean, e.g. 0.3,0.7.")] = None,
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt (classifier-free guidance).")] = "",
    steps: Annotated[int, typer.Option(help="DDIM steps.")] = 50,
    guidance: Annotated[float, typer.Option(help="Guidance scale (1 or less: no guidance).")] = 7.5,
    seed: Annotated[int, typer.Option(help="Seed of the generated source's noise.")] = 0,
    height: Annotated[int, typer.Option(help="Image height, a multiple of 8.")] = 512,
    width: Annotated[int, typer.Option(help="Image width, a multiple of 8.")] = 512,
    cross_replace_steps: Annotated[float, typer.Option(
        help="Share of the steps that keep the source's attention maps for the shared words.")] = 0.8,
    mask_threshold: Annotated[float, typer.Option(
        help="Share of its peak above which an attention map marks the edited region.")] = 0.3,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = AUTO,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = AUTO,
) -> None:
    """Subject-driven editing: the subject in place of a word's region of a picture, the rest kept."""
    from blipdiff.tasks.edit import EditConfig, edit_picture

    config = config_from(EditConfig, model=model, source_prompt=source_prompt, source_image=source_image,
                                 edit_token=edit_token, images=image, weights=numbers(weights, "--weights"),
                                 subject=subject, prompt=prompt, out=out, negative_prompt=negative_prompt, steps=steps,
                                 guidance=guidance, seed=seed, height=height, width=width,
                                 cross_replace_steps=cross_replace_steps, mask_threshold=mask_threshold, dtype=dtype,
                                 device=device)
    try:
        folder = edit_picture(config, log=typer.echo)
    except (ValueError, OSError) as error:
        raise fail(str(error)) from error
    typer.echo(f"edited.png, source.png, mask.png -> {folder}")


def interpolate_command(
    model: Annotated[str, typer.Option(help="Hub id or local checkpoint folder (the official layout).")],
    image: Annotated[list[Path], typer.Option(help="One photo per subject: 2 (a path) or 4 (a square's corners).")],
    subject: Annotated[list[str], typer.Option(help="Each --image's category, in the same order.")],
    prompt: Annotated[str, typer.Option(help="What to generate, e.g. 'on the beach'.")],
    out: Annotated[Path, typer.Option(help="Folder for the cells, grid.png and interpolation.parquet.")],
    target_subject: Annotated[str | None, typer.Option(
        help="Category written into the prompt (default: the first --subject).")] = None,
    cells: Annotated[int, typer.Option("--cells", "--steps", help="Cells along a side.")] = 5,
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt (classifier-free guidance).")] = "",
    denoising_steps: Annotated[int, typer.Option(help="Denoising steps per cell.")] = 50,
    guidance: Annotated[float, typer.Option(help="Guidance scale.")] = 7.5,
    seed: Annotated[int, typer.Option(help="The one seed of every cell.")] = 0,
    height: Annotated[int, typer.Option(help="Cell height, a multiple of 8.")] = 512,
    width: Annotated[int, typer.Option(help="Cell width, a multiple of 8.")] = 512,
    scheduler: Annotated[str, typer.Option(help="pndm, ddim or dpm.")] = "pndm",
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = AUTO,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = AUTO,
) -> None:
    """Subject interpolation: a grid of the blends of 2 or 4 subjects' embeddings, at one seed."""
    from blipdiff.tasks.interpolate import InterpolateConfig, interpolate

    config = config_from(InterpolateConfig, model=model, images=image, subjects=subject,
                                        target_subject=target_subject or subject[0], prompt=prompt, out=out, cells=cells,
                                        negative_prompt=negative_prompt, steps=denoising_steps,
                                        guidance=guidance, seed=seed, height=height, width=width, scheduler=scheduler,
                                        dtype=dtype, device=device)
    try:
        grid = interpolate(config, log=typer.echo)
    except (ValueError, OSError) as error:
        raise fail(str(error)) from error
    typer.echo(f"grid -> {grid}")
