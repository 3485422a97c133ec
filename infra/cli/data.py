"""The data commands: filter, fetch, build, matte, catalog and the FiftyOne App."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from blipdiff.infra.cli.common import fail
from blipdiff.models import DEFAULT_BLIP2, DEFAULT_CLIPSEG
from blipdiff.models.devices import AUTO, DEVICE_HELP


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
    from blipdiff.infra.cli.report import print_funnel
    from pydantic import ValidationError

    try:
        limit = {"memory_limit": memory_limit} if memory_limit else {}
        config = FilterConfig(boxes=boxes, classes=classes, out=out, rules=rules, **limit)
        result = run_filter(config)
    except (ValueError, FileNotFoundError, ValidationError) as error:
        raise fail(str(error)) from error
    print_funnel(result.funnel)
    typer.echo(f"{result.funnel.subjects} subjects -> {out / 'subjects.parquet'}")


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
    from blipdiff.infra.cli.report import print_fetch_summary, run_with_progress
    from pydantic import ValidationError

    try:
        config = FetchConfig(
            subjects=subjects, out=out, split=split, images_csv=images_csv, thumbnails=thumbnails,
            from_dir=from_dir, timeout=timeout, retries=retries, backoff=backoff, workers=workers, ray=ray,
            **({"url_template": url_template} if url_template is not None else {}),
        )
        summary = run_with_progress("fetch", lambda progress: fetch_images(config, progress=progress))
    except (ValueError, FileNotFoundError, ValidationError) as error:
        raise fail(str(error)) from error
    print_fetch_summary(summary)
    typer.echo(f"manifest -> {out / 'images.parquet'}; rejects -> {out / 'rejects.parquet'}")


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
    from blipdiff.infra.cli.report import print_build_summary, run_with_progress
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
        raise fail(str(error)) from error
    print_build_summary(summary)
    typer.echo(f"pairs -> {out / 'pairs.parquet'}; rejects -> {out / 'rejects.parquet'}")


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
        raise fail("give exactly one of --trimaps and --boxes")
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
        raise fail(str(error)) from error
    typer.echo(f"{len(report.written)} mattes -> {out}")
    for name, reason in report.failed.items():
        typer.secho(f"failed: {name}: {reason}", fg=typer.colors.YELLOW, err=True)
    if report.failed:
        raise typer.Exit(code=1)


def catalog_command(
    pairs: Annotated[Path, typer.Option(help="Build folder: pairs.parquet, rejects.parquet and the pairs' images.")],
    dataset: Annotated[str, typer.Option(help="FiftyOne dataset name.")],
    replace: Annotated[bool, typer.Option(help="Delete the dataset first, even if it catalogues another build.")]
    = False,
) -> None:
    """Catalogue every pair (and every rejected subject) in a grouped FiftyOne dataset."""
    from blipdiff.datasets.catalog import CatalogConfig, CatalogError, catalog_pairs
    from blipdiff.infra.cli.report import print_catalog_summary
    from pydantic import ValidationError

    try:
        summary = catalog_pairs(CatalogConfig(pairs=pairs, dataset=dataset, replace=replace))
    except (CatalogError, ValidationError, OSError) as error:
        raise fail(str(error)) from error
    print_catalog_summary(summary)


def app_command(
    dataset: Annotated[str | None, typer.Option(help="Dataset to open; the App's dataset picker otherwise.")] = None,
    port: Annotated[int, typer.Option(help="Port of the FiftyOne App on 127.0.0.1.")] = 5151,
) -> None:
    """Serve the FiftyOne App on 127.0.0.1 until interrupted."""
    from blipdiff.datasets.catalog import import_fiftyone

    fo = import_fiftyone()

    if dataset is not None and not fo.dataset_exists(dataset):
        known = ", ".join(fo.list_datasets()) or "none"
        raise fail(f"no dataset {dataset!r} (datasets: {known}); `blipdiff catalog` makes one")
    session = fo.launch_app(fo.load_dataset(dataset) if dataset else None, address="127.0.0.1", port=port,
                            remote=True, auto=False)
    typer.echo(f"FiftyOne App: http://127.0.0.1:{port}/ (Ctrl-C stops it)")
    try:
        session.wait(-1)
    except KeyboardInterrupt:
        session.close()
