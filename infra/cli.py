"""The `blipdiff` command. Heavy libraries are imported inside the commands that need them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
) -> None:
    """Choose one subject per image by the paper's rules (appendix A.4)."""
    from pydantic import ValidationError

    from blipdiff.datasets.openimages import FilterConfig, run_filter
    from blipdiff.infra.report import print_funnel

    try:
        config = FilterConfig(boxes=boxes, classes=classes, out=out, rules=rules)
        result = run_filter(config)
    except (ValueError, FileNotFoundError, ValidationError) as error:
        raise _fail(str(error)) from error
    print_funnel(result.funnel)
    typer.echo(f"{result.funnel.subjects} subjects -> {out / 'subjects.parquet'}")


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option(help="Folder for the demo's outputs.")] = Path("blipdiff-demo"),
) -> None:
    """Run the pipeline on the bundled sample (no weights, no network)."""
    from blipdiff.datasets.openimages import FilterConfig, run_filter
    from blipdiff.datasets.samples import demo_annotations
    from blipdiff.infra.report import print_funnel

    boxes, classes = demo_annotations()
    result = run_filter(FilterConfig(boxes=boxes, classes=classes, out=out))
    print_funnel(result.funnel)
    typer.echo(result.subjects[["image_id", "label_name", "area", "aspect"]].to_string(index=False))
    typer.echo(f"\n{result.funnel.subjects} subjects -> {out.resolve() / 'subjects.parquet'}")


if __name__ == "__main__":
    app()
