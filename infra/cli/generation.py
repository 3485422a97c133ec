"""The generation commands: generate, edit, interpolate."""

from __future__ import annotations

import typer
from blipdiff.infra.cli.common import Opt, config_from, fail, numbers, options_from
from blipdiff.tasks.edit import EditConfig
from blipdiff.tasks.generate import GenerateConfig
from blipdiff.tasks.interpolate import InterpolateConfig

# The config's weights are numbers; the command takes them as one comma-separated string (--weights 0.3,0.7),
# which is the command's own format, hence its own help.
WEIGHTS = Opt("weights", type=str | None, help="Each --image's weight in the mean, e.g. 0.3,0.7.")


@options_from(GenerateConfig, "model", "subject", Opt("prompts", "--prompt"), "out", Opt("images", "--image"),
              "subject_checkpoint", "target_subject", "negative_prompt", "steps", "guidance", "seed", "num_images",
              "height", "width", "scheduler", "dtype", "device", Opt("image_subjects", "--image-subject"), WEIGHTS,
              Opt("controls", "--control"), Opt("control_types", "--control-type"),
              Opt("controlnets", "--controlnet"), Opt("control_scales", "--control-scale"), "method")
def generate_command(**fields) -> None:
    """Subject-driven generation with BLIP-Diffusion: PNGs plus a sidecar that makes each again exactly.
    With --control, under the structure of the control images (ControlNet); with --weights, a blend."""
    from blipdiff.tasks.generate import generate_images

    fields["weights"] = numbers(fields["weights"], "--weights")
    config = config_from(GenerateConfig, **fields)
    try:
        manifest = generate_images(config, log=typer.echo)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise fail(str(error)) from error
    typer.echo(f"{len(config.prompts) * config.num_images} images -> {fields['out']}; settings and seeds -> {manifest}")


@options_from(EditConfig, "model", "edit_token", Opt("images", "--image"), "subject", "prompt", "out", "source_prompt",
              "source_image", WEIGHTS, "negative_prompt", "steps", "guidance", "seed", "height", "width",
              "cross_replace_steps", "mask_threshold", "dtype", "device")
def edit_command(**fields) -> None:
    """Subject-driven editing: the subject in place of a word's region of a picture, the rest kept."""
    from blipdiff.tasks.edit import edit_picture

    fields["weights"] = numbers(fields["weights"], "--weights")
    config = config_from(EditConfig, **fields)
    try:
        folder = edit_picture(config, log=typer.echo)
    except (ValueError, OSError) as error:
        raise fail(str(error)) from error
    typer.echo(f"edited.png, source.png, mask.png -> {folder}")


@options_from(InterpolateConfig, "model", Opt("images", "--image"), Opt("subjects", "--subject"), "prompt", "out",
              "target_subject", Opt("cells", "--cells", "--steps"), "negative_prompt",
              Opt("steps", "--denoising-steps"), "guidance", "seed", "height", "width", "scheduler", "dtype", "device")
def interpolate_command(**fields) -> None:
    """Subject interpolation: a grid of the blends of 2 or 4 subjects' embeddings, at one seed."""
    from blipdiff.tasks.interpolate import interpolate

    config = config_from(InterpolateConfig, **fields)
    try:
        grid = interpolate(config, log=typer.echo)
    except (ValueError, OSError) as error:
        raise fail(str(error)) from error
    typer.echo(f"grid -> {grid}")
