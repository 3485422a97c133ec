"""The data commands: filter, fetch, build, matte, catalog and the FiftyOne App."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from blipdiff.datasets.configs import BuildConfig, CatalogConfig, FetchConfig, FilterConfig
from blipdiff.infra.cli.common import Opt, config_from, fail, options_from
from blipdiff.models import DEFAULT_CLIPSEG


@options_from(FilterConfig, "boxes", "classes", "out", "rules", "memory_limit")
def filter_command(**fields) -> None:
    """Choose one subject per image by the paper's rules (appendix A.4)."""
    from blipdiff.datasets.openimages import run_filter
    from blipdiff.infra.cli.report import print_funnel

    config = config_from(FilterConfig, **fields)  # one line per invalid field, not pydantic's dump
    try:
        result = run_filter(config)
    except (ValueError, FileNotFoundError) as error:
        raise fail(str(error)) from error
    print_funnel(result.funnel)
    typer.echo(f"{result.funnel.subjects} subjects -> {config.out / 'subjects.parquet'}")


@options_from(FetchConfig, "subjects", "out", "url_template", "split", "images_csv", "thumbnails", "from_dir", "timeout",
              "retries", "backoff", "workers", Opt("ray", "--ray/--no-ray"))
def fetch_command(**fields) -> None:
    """Fetch the subjects' images into one verified, sharded folder; reruns resume."""
    from blipdiff.datasets.fetch import fetch_images
    from blipdiff.infra.cli.report import print_fetch_summary, run_with_progress

    config = config_from(FetchConfig, **fields)  # one line per invalid field, not pydantic's dump
    try:
        summary = run_with_progress("fetch", lambda progress: fetch_images(config, progress=progress))
    except (ValueError, FileNotFoundError) as error:
        raise fail(str(error)) from error
    print_fetch_summary(summary)
    typer.echo(f"manifest -> {config.out / 'images.parquet'}; rejects -> {config.out / 'rejects.parquet'}")


@options_from(BuildConfig, "subjects", "images", "backgrounds", "out", "captioner", "caption_model", "clip_model",
              "num_captions", "segmenter", "segment_model", "device", "actors", "gpus_per_actor",
              Opt("model_batch_size", "--batch-size"), "seed", "trimap.high", "trimap.low", "trimap.band",
              Opt("matting.working_long_side", "--working-long-side"))
def build_command(**fields) -> None:
    """Build the synthetic training pairs: caption, segment, trimap, matte, composite."""
    from blipdiff.datasets.build import build_pairs
    from blipdiff.infra.cli.report import print_build_summary, run_with_progress

    config = config_from(BuildConfig, **fields)  # one line per invalid field, not pydantic's dump
    try:
        summary = run_with_progress("build", lambda progress: build_pairs(config, progress=progress))
    except (ValueError, FileNotFoundError) as error:
        raise fail(str(error)) from error
    print_build_summary(summary)
    typer.echo(f"pairs -> {config.out / 'pairs.parquet'}; rejects -> {config.out / 'rejects.parquet'}")


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


@options_from(CatalogConfig, "pairs", "dataset", "replace")
def catalog_command(**fields) -> None:
    """Catalogue every pair (and every rejected subject) in a grouped FiftyOne dataset."""
    from blipdiff.datasets.catalog import CatalogError, catalog_pairs
    from blipdiff.infra.cli.report import print_catalog_summary

    config = config_from(CatalogConfig, **fields)
    try:
        summary = catalog_pairs(config)
    except (CatalogError, OSError) as error:
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
