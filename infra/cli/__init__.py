"""The `blipdiff` command. Heavy libraries are imported inside the commands that need them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from blipdiff.models import DEFAULT_BLIP2, DEFAULT_CLIP, DEFAULT_CLIPSEG, DEFAULT_DINO
from blipdiff.models.devices import AUTO, DEVICE_HELP, DTYPE_HELP

app = typer.Typer(
    name="blipdiff",
    help="BLIP-Diffusion's data pipeline, training and DreamBench evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


@app.command("filter")
def filter_command(
    boxes: Annotated[Path, typer.Option(help="Open Images box annotations (.csv, .csv.gz or .parquet).")],
    classes: Annotated[Path, typer.Option(help="Class descriptions: `MID,Name`, no header.")],
    out: Annotated[Path, typer.Option(help="Folder for subjects.parquet and funnel.json.")],
    rules: Annotated[
        Path | None, typer.Option(help="Rules TOML replacing the paper's thresholds and class lists.")
    ] = None,
    memory_limit: Annotated[
        str | None,
        typer.Option(help="DuckDB's memory limit (e.g. 400MB, 2GB; the filter's own when absent); it spills into OUT."),
    ] = None,
) -> None:
    """Choose one subject per image by the paper's rules (appendix A.4)."""
    from blipdiff.datasets.openimages import FilterConfig, run_filter
    from blipdiff.infra.report import print_funnel
    from pydantic import ValidationError

    try:
        limit = {"memory_limit": memory_limit} if memory_limit else {}
        config = FilterConfig(boxes=boxes, classes=classes, out=out, rules=rules, **limit)
        result = run_filter(config)
    except (ValueError, FileNotFoundError, ValidationError) as error:
        raise _fail(str(error)) from error
    print_funnel(result.funnel)
    typer.echo(f"{result.funnel.subjects} subjects -> {out / 'subjects.parquet'}")


@app.command("fetch")
def fetch_command(
    subjects: Annotated[Path, typer.Option(help="Parquet with an image_id column (the filter's subjects.parquet).")],
    out: Annotated[Path, typer.Option(help="Image folder: images/, images.parquet, rejects.parquet.")],
    url_template: Annotated[
        str | None,
        typer.Option(help="URL with {image_id} and {split}. [default: the official Open Images location]"),
    ] = None,
    split: Annotated[str, typer.Option(help="Open Images split that fills {split}.")] = "train",
    images_csv: Annotated[
        Path | None, typer.Option(help="The dataset's images CSV: download its OriginalURL (md5-checked).")
    ] = None,
    thumbnails: Annotated[bool, typer.Option(help="With --images-csv: Thumbnail300KURL instead.")] = False,
    from_dir: Annotated[Path | None, typer.Option(help="Ingest {image_id}.<ext> files from this folder.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to connect and between bytes.")] = 30.0,
    retries: Annotated[int, typer.Option(help="Retries after a 5xx, a timeout or a broken connection.")] = 3,
    backoff: Annotated[float, typer.Option(help="Seconds before the first retry, doubled each time.")] = 1.0,
    workers: Annotated[int, typer.Option(help="Downloads in flight (per Ray task on a cluster).")] = 16,
    ray: Annotated[
        bool | None, typer.Option("--ray/--no-ray", help="Fan out through Ray (default: when RAY_ADDRESS is set).")
    ] = None,
) -> None:
    """Fetch the subjects' images into one verified, sharded folder; reruns resume."""
    from blipdiff.datasets.fetch import FetchConfig, fetch_images
    from blipdiff.infra.report import print_fetch_summary, run_with_progress
    from pydantic import ValidationError

    try:
        config = FetchConfig(
            subjects=subjects, out=out, split=split, images_csv=images_csv, thumbnails=thumbnails,
            from_dir=from_dir, timeout=timeout, retries=retries, backoff=backoff, workers=workers, ray=ray,
            **({"url_template": url_template} if url_template is not None else {}),
        )
        summary = run_with_progress("fetch", lambda progress: fetch_images(config, progress=progress))
    except (ValueError, FileNotFoundError, ValidationError) as error:
        raise _fail(str(error)) from error
    print_fetch_summary(summary)
    typer.echo(f"manifest -> {out / 'images.parquet'}; rejects -> {out / 'rejects.parquet'}")


@app.command("build")
def build_command(
    subjects: Annotated[Path, typer.Option(help="The filter's subjects.parquet.")],
    images: Annotated[Path, typer.Option(help="A fetch output folder, or a folder of {image_id}.jpg.")],
    backgrounds: Annotated[Path, typer.Option(help="Folder of background photos.")],
    out: Annotated[Path, typer.Option(help="Output folder: pairs.parquet, rejects.parquet, image files.")],
    captioner: Annotated[str, typer.Option(help="template (weight-free) or blip2.")] = "template",
    caption_model: Annotated[str, typer.Option(help="BLIP-2 hub id or local folder.")] = DEFAULT_BLIP2,
    clip_model: Annotated[str | None, typer.Option(help="CLIP hub id or folder that ranks sampled captions.")] = None,
    num_captions: Annotated[int, typer.Option(help="Captions sampled per image (the authors: 48).")] = 1,
    segmenter: Annotated[str, typer.Option(help="grabcut (weight-free) or clipseg.")] = "grabcut",
    segment_model: Annotated[str, typer.Option(help="CLIPSeg hub id or local folder.")] = DEFAULT_CLIPSEG,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = AUTO,
    actors: Annotated[int, typer.Option(help="Actors per model stage.")] = 1,
    gpus_per_actor: Annotated[float, typer.Option(help="GPUs per model actor.")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the background draws.")] = 0,
    trimap_high: Annotated[float, typer.Option(help="Subject probability at or above: foreground.")] = 0.5,
    trimap_low: Annotated[float, typer.Option(help="Subject probability below: background.")] = 0.25,
    trimap_band: Annotated[
        float, typer.Option(help="Unknown band on each side of the edge, as a fraction of the box's long side.")
    ] = 0.02,
    working_long_side: Annotated[int, typer.Option(help="Long side at which the matte is solved.")] = 512,
) -> None:
    """Build the synthetic training pairs: caption, segment, trimap, matte, composite."""
    from blipdiff.datasets.build import BuildConfig, build_pairs
    from blipdiff.infra.report import print_build_summary, run_with_progress
    from pydantic import ValidationError

    try:
        config = BuildConfig(
            subjects=subjects, images=images, backgrounds=backgrounds, out=out, captioner=captioner,
            caption_model=caption_model, clip_model=clip_model, num_captions=num_captions, segmenter=segmenter,
            segment_model=segment_model, device=device, actors=actors, gpus_per_actor=gpus_per_actor,
            model_batch_size=batch_size, seed=seed,
            trimap={"high": trimap_high, "low": trimap_low, "band": trimap_band},
            matting={"working_long_side": working_long_side},
        )
        summary = run_with_progress("build", lambda progress: build_pairs(config, progress=progress))
    except (ValueError, FileNotFoundError, ValidationError) as error:
        raise _fail(str(error)) from error
    print_build_summary(summary)
    typer.echo(f"pairs -> {out / 'pairs.parquet'}; rejects -> {out / 'rejects.parquet'}")


@app.command("matte")
def matte_command(
    images: Annotated[Path, typer.Option(help="Folder of images to matte.")],
    out: Annotated[Path, typer.Option(help="Folder for the 8-bit PNG alphas (same file names).")],
    trimaps: Annotated[Path | None, typer.Option(help="Folder of same-named trimaps (0, 128, 255).")] = None,
    boxes: Annotated[
        Path | None,
        typer.Option(help="CSV name,x_min,x_max,y_min,y_max[,label] (normalised; clipseg needs the label)."),
    ] = None,
    segmenter: Annotated[str, typer.Option(help="With --boxes: grabcut (weight-free) or clipseg.")] = "grabcut",
    segment_model: Annotated[str, typer.Option(help="With clipseg: hub id or local folder.")] = DEFAULT_CLIPSEG,
    working_long_side: Annotated[
        int | None, typer.Option(help="Solve at this long side and scale back (default: full resolution).")
    ] = None,
) -> None:
    """Pull an alpha matte for every image in a folder, from trimaps or from boxes."""
    from blipdiff.datasets.matting import MattingConfig, matte_folder, read_box_csv
    from blipdiff.models.segmenters import make_segmenter

    if (trimaps is None) == (boxes is None):
        raise _fail("give exactly one of --trimaps and --boxes")
    try:
        box_rows, labels = read_box_csv(boxes) if boxes else (None, None)
        if segmenter == "clipseg" and set(box_rows or ()) - set(labels or ()):
            raise ValueError("clipseg is prompted with each image's class name: give every row of --boxes a label column")
        options = {"model": segment_model} if segmenter == "clipseg" else {}
        report = matte_folder(
            images, out, trimaps=trimaps, boxes=box_rows, labels=labels,
            segmenter=make_segmenter(segmenter, **options) if boxes else None,
            matting=MattingConfig(working_long_side=working_long_side),
        )
    except (ValueError, FileNotFoundError, OSError) as error:
        raise _fail(str(error)) from error
    typer.echo(f"{len(report.written)} mattes -> {out}")
    for name, reason in report.failed.items():
        typer.secho(f"failed: {name}: {reason}", fg=typer.colors.YELLOW, err=True)
    if report.failed:
        raise typer.Exit(code=1)


@app.command("catalog")
def catalog_command(
    pairs: Annotated[Path, typer.Option(help="Build folder: pairs.parquet, rejects.parquet and the pairs' images.")],
    dataset: Annotated[str, typer.Option(help="FiftyOne dataset name.")],
    replace: Annotated[bool, typer.Option(help="Delete the dataset first, even if it catalogues another build.")]
    = False,
) -> None:
    """Catalogue every pair (and every rejected subject) in a grouped FiftyOne dataset."""
    from blipdiff.datasets.catalog import CatalogConfig, CatalogError, catalog_pairs
    from blipdiff.infra.report import print_catalog_summary
    from pydantic import ValidationError

    try:
        summary = catalog_pairs(CatalogConfig(pairs=pairs, dataset=dataset, replace=replace))
    except (CatalogError, ValidationError, OSError) as error:
        raise _fail(str(error)) from error
    print_catalog_summary(summary)


@app.command("app")
def app_command(
    dataset: Annotated[str | None, typer.Option(help="Dataset to open; the App's dataset picker otherwise.")] = None,
    port: Annotated[int, typer.Option(help="Port of the FiftyOne App on 127.0.0.1.")] = 5151,
) -> None:
    """Serve the FiftyOne App on 127.0.0.1 until interrupted."""
    from blipdiff.datasets.catalog import import_fiftyone

    fo = import_fiftyone()

    if dataset is not None and not fo.dataset_exists(dataset):
        known = ", ".join(fo.list_datasets()) or "none"
        raise _fail(f"no dataset {dataset!r} (datasets: {known}); `blipdiff catalog` makes one")
    session = fo.launch_app(fo.load_dataset(dataset) if dataset else None, address="127.0.0.1", port=port,
                            remote=True, auto=False)
    typer.echo(f"FiftyOne App: http://127.0.0.1:{port}/ (Ctrl-C stops it)")
    try:
        session.wait(-1)
    except KeyboardInterrupt:
        session.close()


@app.command("generate")
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
    from blipdiff.models.generation import GenerateConfig, generate_images

    config = _config(GenerateConfig, model=model, images=image or [], subject_checkpoint=subject_checkpoint,
                                     subject=subject, target_subject=target_subject, prompts=prompt, out=out,
                                     negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=seed,
                                     num_images=num_images, height=height, width=width, scheduler=scheduler,
                                     dtype=dtype, device=device, image_subjects=image_subject or [],
                                     weights=_numbers(weights, "--weights"), controls=control or [],
                                     control_types=control_type or ["image"], controlnets=controlnet or [],
                                     control_scales=control_scale or [1.0], method=method)
    try:
        manifest = generate_images(config, log=typer.echo)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise _fail(str(error)) from error
    typer.echo(f"{len(config.prompts) * num_images} images -> {out}; settings and seeds -> {manifest}")


def _numbers(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as error:
        raise _fail(f"{option} {text!r}: comma-separated numbers, e.g. 0.3,0.7") from error


@app.command("edit")
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
    from blipdiff.models.editing import EditConfig, edit_picture

    config = _config(EditConfig, model=model, source_prompt=source_prompt, source_image=source_image,
                                 edit_token=edit_token, images=image, weights=_numbers(weights, "--weights"),
                                 subject=subject, prompt=prompt, out=out, negative_prompt=negative_prompt, steps=steps,
                                 guidance=guidance, seed=seed, height=height, width=width,
                                 cross_replace_steps=cross_replace_steps, mask_threshold=mask_threshold, dtype=dtype,
                                 device=device)
    try:
        folder = edit_picture(config, log=typer.echo)
    except (ValueError, OSError) as error:
        raise _fail(str(error)) from error
    typer.echo(f"edited.png, source.png, mask.png -> {folder}")


@app.command("interpolate")
def interpolate_command(
    model: Annotated[str, typer.Option(help="Hub id or local checkpoint folder (the official layout).")],
    image: Annotated[list[Path], typer.Option(help="One photo per subject: 2 (a path) or 4 (a square's corners).")],
    subject: Annotated[list[str], typer.Option(help="Each --image's category, in the same order.")],
    prompt: Annotated[str, typer.Option(help="What to generate, e.g. 'on the beach'.")],
    out: Annotated[Path, typer.Option(help="Folder for the cells, grid.png and interpolation.parquet.")],
    target_subject: Annotated[str | None, typer.Option(
        help="Category written into the prompt (default: the first --subject).")] = None,
    steps: Annotated[int, typer.Option(help="Cells along a side.")] = 5,
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
    from blipdiff.models.interpolation import InterpolateConfig, interpolate

    config = _config(InterpolateConfig, model=model, images=image, subjects=subject,
                                        target_subject=target_subject or subject[0], prompt=prompt, out=out, steps=steps,
                                        negative_prompt=negative_prompt, denoising_steps=denoising_steps,
                                        guidance=guidance, seed=seed, height=height, width=width, scheduler=scheduler,
                                        dtype=dtype, device=device)
    try:
        grid = interpolate(config, log=typer.echo)
    except (ValueError, OSError) as error:
        raise _fail(str(error)) from error
    typer.echo(f"grid -> {grid}")


def _config(config_class, /, **fields):
    """The command's configuration model, its validation errors as one line of 'field: message's."""
    from pydantic import ValidationError

    try:
        return config_class(**fields)
    except ValidationError as error:
        raise _fail("; ".join(_validation_messages(error))) from error


def _validation_messages(error) -> list[str]:
    """Pydantic's errors as 'field: message' lines, without its URLs and input dumps."""
    return [f"{'.'.join(str(part) for part in item['loc']) or 'input'}: {item['msg'].removeprefix('Value error, ')}"
            for item in error.errors()]


@app.command("finetune")
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
    from blipdiff.models.training.finetune import FinetuneConfig

    config = _config(FinetuneConfig, model=model, images=images, subject=subject, out=out, steps=steps, lr=lr,
                                     batch_size=batch_size, mode=mode, lora_rank=lora_rank, precision=precision,
                                     resolution=resolution, seed=seed, device=device)
    from blipdiff.models.training.finetune import finetune

    try:
        finetune(config, log=typer.echo)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise _fail(str(error)) from error
    typer.echo(f"use it: blipdiff generate --model {model} --subject-checkpoint {out} --subject {subject} --prompt ...")


@app.command("dreambooth")
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
    from blipdiff.models.training.dreambooth import DreamBoothConfig, run_dreambooth

    config = _config(DreamBoothConfig, base=base, images=images, class_noun=class_noun, out=out, identifier=identifier,
                                       steps=steps, lr=lr, max_grad_norm=max_grad_norm or None, batch_size=batch_size,
                                       prior_preservation=prior_preservation,
                                       num_class_images=num_class_images, prior_loss_weight=prior_loss_weight,
                                       train_text_encoder=train_text_encoder, mode=mode, lora_rank=lora_rank,
                                       precision=precision, resolution=resolution, seed=seed, class_images=class_images,
                                       workers=workers, checkpoint_every=checkpoint_every)
    try:
        run_dreambooth(config, log=typer.echo)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise _fail(str(error)) from error
    typer.echo(f"use it: blipdiff generate --method dreambooth --model {base} --subject-checkpoint {out} "
               f"--subject {class_noun} --prompt 'a {identifier} {class_noun} in the jungle'")


@app.command("encode-latents")
def encode_latents_command(
    pairs: Annotated[Path, typer.Option(help="Build folder (blipdiff build --out) with pairs.parquet.")],
    model: Annotated[str, typer.Option(help="Hub id or local checkpoint folder whose vae/ encodes the targets.")],
    resolution: Annotated[int, typer.Option(help="Side of the square targets.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Targets per VAE call.")] = 8,
    actors: Annotated[int, typer.Option(help="VAE actors (one per GPU, say).")] = 1,
    gpus_per_actor: Annotated[float | None, typer.Option(help="GPUs per actor (default: 1 when Ray sees GPUs).")] = None,
) -> None:
    """Encode every pair's target photo once with the VAE: the cache pre-training reads (a rerun skips what is done)."""
    from blipdiff.datasets.latents import EncodeLatentsConfig, encode_latents

    config = _config(EncodeLatentsConfig, pairs=pairs, model=model, resolution=resolution, batch_size=batch_size,
                                          actors=actors, gpus_per_actor=gpus_per_actor)
    from blipdiff.infra.report import run_with_progress

    try:
        summary = run_with_progress("encoding", lambda progress: encode_latents(config, progress=progress, log=typer.echo))
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise _fail(str(error)) from error
    typer.echo(f"{summary.available} latents -> {summary.folder}")


@app.command("pretrain")
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
    from blipdiff.models.training.pretrain import PretrainConfig

    config = _config(PretrainConfig, pairs=pairs, init=init, out=out, reset_from_sd=reset_from_sd, steps=steps,
                                     batch_size=batch_size, grad_accum=grad_accum, workers=workers,
                                     gpus_per_worker=gpus_per_worker, lr=lr, weight_decay=weight_decay,
                                     max_grad_norm=max_grad_norm, resolution=resolution, precision=precision,
                                     gradient_checkpointing=gradient_checkpointing, subject_dropout=subject_dropout,
                                     checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                                     validate_every=validate_every, validation_pairs=validation_pairs,
                                     validation_steps=validation_steps, log_every=log_every, seed=seed)
    from blipdiff.infra.report import training_progress
    from blipdiff.models.training.distributed import run_pretrain

    try:
        with training_progress(config.steps) as on_progress:
            summary = run_pretrain(config, log=typer.echo, on_progress=on_progress)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise _fail(str(error)) from error
    typer.echo(f"step {summary.step} of {steps}: checkpoint -> {summary.checkpoint}")
    typer.echo(f"metrics -> {out / 'metrics.parquet'}; TensorBoard: tensorboard --logdir {out / 'logs'}")


@app.command("score")
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
    from blipdiff.models.scoring import ScoreConfig, run_score

    config = _config(ScoreConfig, dreambench=dreambench, out=out, images=images, oracle=oracle, dino=dino, clip=clip,
                                  batch_size=batch_size, device=device)
    try:
        summary = run_score(config, log=typer.echo)
    except (ValueError, OSError) as error:  # DreamBenchError is a ValueError
        raise _fail(str(error)) from error
    means = summary["mean_over_subjects"]
    typer.echo(f"{summary['subjects']} subjects, mean over subjects: "
               + ", ".join(f"{metric} {value:.4f}" for metric, value in means.items()))
    typer.echo(f"scores -> {out / 'scores.parquet'}; summary -> {out / 'summary.json'}")


@app.command("eval")
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
    from blipdiff.models.evaluation import EvalConfig

    if (method == "dreambooth") != (base is not None) or (model is None) == (base is None):
        raise _fail("give --model (BLIP-Diffusion), or --method dreambooth with --base")
    config = _config(EvalConfig, model=model or base, method=method, dreambooth_steps=dreambooth_steps,
                                 dreambooth_lr=dreambooth_lr, prior_preservation=prior_preservation,
                                 num_class_images=num_class_images, identifier=identifier, dreambench=dreambench,
                                 out=out, mode=mode, subjects=subjects.split(",") if subjects else [], prompts=prompts,
                                 images_per_prompt=images_per_prompt, steps=steps, guidance=guidance,
                                 seed_sets=seed_sets, reference=reference, resolution=resolution,
                                 negative_prompt=negative_prompt, finetune_steps=finetune_steps,
                                 finetune_mode=finetune_mode, finetune_precision=finetune_precision, dtype=dtype,
                                 dino=dino, clip=clip, dataset=dataset, actors=actors)
    from blipdiff.infra.report import run_with_progress
    from blipdiff.models.evaluation import check_run_folder, plan, run_eval

    try:
        plan(config)  # refused input in one line, before the progress bar
        check_run_folder(config)
        summary = run_with_progress("subjects", lambda progress: run_eval(config, log=typer.echo, progress=progress))
    except (ValueError, OSError) as error:  # DreamBenchError and CheckpointError are ValueErrors
        raise _fail(str(error)) from error
    means = summary["mean_over_subjects"]
    typer.echo(f"{summary['subjects']} subjects, {summary['images']} images, mean over subjects: "
               + ", ".join(f"{metric} {value:.4f}" for metric, value in means.items()))
    typer.echo(f"report -> {out / 'report.md'}")
    if "catalog" in summary:
        typer.echo(f"FiftyOne dataset {summary['catalog']['dataset']!r}: `blipdiff app --dataset {summary['catalog']['dataset']}`")


@app.command("compare")
def compare_command(
    runs: Annotated[list[Path], typer.Argument(help="Evaluation run folders (blipdiff eval --out), two or more.")],
    out: Annotated[Path | None, typer.Option(help="Also write the table to this markdown file.")] = None,
) -> None:
    """Evaluation runs side by side: DINO, CLIP-I, CLIP-T (overall, per subject, per prompt kind) beside
    the papers', and each subject's fine-tuning wall time."""
    from blipdiff.models.evaluation_report import compare_runs

    try:
        table = compare_runs(runs)
    except (ValueError, OSError) as error:
        raise _fail(str(error)) from error
    typer.echo(table)
    if out is not None:
        from blipdiff.infra.atomic import atomic_path

        with atomic_path(out) as partial:
            partial.write_text(table, encoding="utf-8")


@app.command("serve")
def serve_command(
    data: Annotated[Path, typer.Option(help="Data folder; Prefect's state lives in DATA/prefect without PREFECT_API_URL.")]
    = Path("blipdiff-data"),
    parameters: Annotated[
        Path | None, typer.Option(help="JSON file of build_pairs parameters: the deployment's defaults.")
    ] = None,
    cron: Annotated[str | None, typer.Option(help="Schedule of the build_pairs deployment (cron).")] = None,
    eval_parameters: Annotated[Path | None, typer.Option(
        help="JSON file of dreambench_eval parameters (model or training_run, dreambench, eval_root, the protocol): "
             "the deployment's defaults, which its schedule runs.")] = None,
    eval_cron: Annotated[str | None, typer.Option(help='Nightly schedule of dreambench_eval (cron), e.g. "0 2 * * *".')]
    = None,
    timezone: Annotated[str, typer.Option(help="Time zone of the schedules (IANA name, e.g. Europe/Paris).")] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "blipdiff",
) -> None:
    """Serve the deployments of the flows (build_pairs, pretrain, dreambench_eval) so that the Prefect UI and
    schedules can run them."""
    import zoneinfo

    from blipdiff.infra.prefect_home import use_project_prefect_home
    from pydantic import ValidationError

    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as error:
        raise _fail(f"--timezone {timezone}: not an IANA time zone") from error
    if eval_cron is not None and eval_parameters is None:
        raise _fail("--eval-cron needs --eval-parameters: a scheduled run has no one to fill in its form")
    use_project_prefect_home(data)

    from blipdiff.flows.build_pairs import BuildPairsParameters, build_pairs_flow
    from blipdiff.flows.dreambench_eval import DreamBenchEvalParameters, dreambench_eval_flow
    from blipdiff.flows.pretrain import pretrain_flow
    from prefect import serve
    from prefect.schedules import Cron

    def defaults(path: Path | None, model) -> dict | None:
        if path is None:
            return None
        try:
            return {"parameters": model.model_validate_json(path.read_text()).model_dump(mode="json")}
        except (OSError, ValidationError) as error:
            raise _fail(f"cannot use {path}: {error}") from error

    def schedules(expression: str | None) -> list:
        return [Cron(expression, timezone=timezone)] if expression else []

    build_defaults, eval_defaults = defaults(parameters, BuildPairsParameters), defaults(eval_parameters,
                                                                                          DreamBenchEvalParameters)
    # Pre-training has no defaults to give: its form asks for the pairs, the starting checkpoint and the run folder.
    serve(build_pairs_flow.to_deployment(name=name, parameters=build_defaults, schedules=schedules(cron)),
          pretrain_flow.to_deployment(name=name),
          dreambench_eval_flow.to_deployment(name=name, parameters=eval_defaults, schedules=schedules(eval_cron)))


@app.command("pin-baseline")
def pin_baseline_command(
    eval_root: Annotated[Path, typer.Option(help="The evaluations' folder (dreambench_eval's eval_root).")],
    run: Annotated[str, typer.Option(help="Run id (its folder's name) to compare every later run with.")],
) -> None:
    """Pin a DreamBench evaluation as the baseline that later comparable runs must not fall below."""
    from blipdiff.models.evaluation_history import pin_baseline

    try:
        pin_baseline(eval_root, run)
    except ValueError as error:
        raise _fail(str(error)) from error
    typer.echo(f"baseline -> {run} ({eval_root / 'baseline.json'})")


@app.command("server")
def server_command(
    data: Annotated[Path, typer.Option(help="Data folder; Prefect's state lives in DATA/prefect without PREFECT_API_URL.")]
    = Path("blipdiff-data"),
    port: Annotated[int, typer.Option(help="Port of the Prefect UI and API on 127.0.0.1.")] = 4200,
) -> None:
    """Start the Prefect UI and API locally on 127.0.0.1."""
    import os
    import sys

    from blipdiff.infra.prefect_home import use_project_prefect_home

    use_project_prefect_home(data)
    # The UI calls the API at this address; Prefect's default assumes port 4200.
    os.environ.setdefault("PREFECT_UI_API_URL", f"http://127.0.0.1:{port}/api")
    prefect = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    os.execv(sys.executable, prefect)


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option(help="Folder for the demo's outputs.")] = Path("blipdiff-demo"),
    dataset: Annotated[
        str, typer.Option(help="FiftyOne dataset that catalogues the pairs (made anew by every demo run); the "
                               "evaluations go to DATASET-dreambench.")
    ] = "blipdiff-demo",
) -> None:
    """The whole chain on the bundled sample, no weights, no network: build_pairs, a short pretrain of a small
    random BLIP-Diffusion, and dreambench_eval on a small benchmark in DreamBench's layout."""
    from blipdiff.infra.prefect_home import use_project_prefect_home

    home = use_project_prefect_home(out)

    from blipdiff.infra.demo import run_demo

    run_demo(out, dataset, log=typer.echo)
    if home is not None:
        typer.echo(f"Prefect runs are kept in {home}: `blipdiff server --data {out}`, then open http://127.0.0.1:4200")


if __name__ == "__main__":
    app()
