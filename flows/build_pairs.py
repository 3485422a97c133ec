"""The `build_pairs` flow: filter → fetch → build → catalog, orchestrated by Prefect, the per-image work on Ray.

Its parameters are one pydantic model, so the Prefect UI shows a validated form and the CLI and the
tests use the same model. The build runs as coarse tasks, one shard of subjects each; every stage
skips what its output folder already holds, so a rerun after a crash finishes the same pairs without
recomputing finished shards. The catalog step mirrors the pairs into a FiftyOne dataset. Artifacts: the
filter funnel as a table, a progress bar per shard, and a markdown summary that names the dataset.
"""

from __future__ import annotations

import io
import shutil
from contextlib import nullcontext
from pathlib import Path

import pyarrow.parquet as pq
from blipdiff.datasets.build import BuildConfig, build_pairs
from blipdiff.datasets.catalog import CatalogConfig
from blipdiff.datasets.fetch import DEFAULT_URL_TEMPLATE, FetchConfig
from blipdiff.datasets.openimages import RULE_ORDER, FilterConfig
from blipdiff.flows.events import emit_pairs_built
from blipdiff.flows.gpu import gpu_slot
from blipdiff.infra.atomic import atomic_path
from blipdiff.tasks.prefect_tasks import build_task, catalog_task, fetch_task, filter_task
from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from pydantic import BaseModel, ConfigDict, Field


class BuildPairsParameters(BaseModel):
    """Everything a `build_pairs` run needs; the Prefect UI renders it as a form."""

    model_config = ConfigDict(extra="forbid")

    boxes: Path = Field(description="Open Images box annotations (.csv, .csv.gz or .parquet)")
    classes: Path = Field(description="class descriptions, `MID,Name` without a header")
    backgrounds: Path = Field(description="folder of background photos")
    data: Path = Field(description="data folder: subjects/, images/, pairs.parquet and the pairs' images")
    rules: Path | None = Field(default=None, description="rules TOML; the paper's when absent")
    from_dir: Path | None = Field(default=None, description="take the images from this folder")
    url_template: str = Field(default=DEFAULT_URL_TEMPLATE, description="else download them from here")
    captioner: str = Field(default="template", description="template or blip2")
    segmenter: str = Field(default="grabcut", description="grabcut or clipseg")
    seed: int = 0
    shard_size: int = Field(default=256, ge=1, description="subjects per build task")
    dataset: str | None = Field(default=None, description="FiftyOne dataset of the catalog; the data folder's name if empty")
    replace_catalog: bool = Field(default=False, description="delete that dataset first, even if it catalogues another build")

    def uses_gpu(self) -> bool:
        """BLIP-2 and CLIPSeg are models (on the GPU where there is one); the template and GrabCut are not."""
        return self.captioner != "template" or self.segmenter != "grabcut"

    def filter_config(self) -> FilterConfig:
        return FilterConfig(boxes=self.boxes, classes=self.classes, out=self.data / "subjects", rules=self.rules)

    def fetch_config(self) -> FetchConfig:
        return FetchConfig(subjects=self.data / "subjects" / "subjects.parquet", out=self.data / "images",
                           from_dir=self.from_dir, url_template=self.url_template)

    def build_config(self, subjects: Path, manifests: Path | None = None) -> BuildConfig:
        return BuildConfig(subjects=subjects, images=self.data / "images", backgrounds=self.backgrounds,
                           out=self.data, manifests=manifests, captioner=self.captioner,
                           segmenter=self.segmenter, seed=self.seed)


    def catalog_config(self) -> CatalogConfig:
        return CatalogConfig(pairs=self.data, dataset=self.dataset or self.data.resolve().name,
                             replace=self.replace_catalog)


def write_shards(subjects: Path, folder: Path, shard_size: int) -> list[Path]:
    """Split the subjects, in image-id order, into ``folder/NNNNN/subjects.parquet``.

    A shard file is rewritten only when its contents change, so an unchanged shard keeps its mtime
    and its build task's cache; shard folders beyond the current count (a larger shard size before)
    are removed.
    """
    table = pq.read_table(subjects).sort_by("image_id")
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, table.num_rows, shard_size)):
        path = folder / f"{index:05d}" / "subjects.parquet"
        buffer = io.BytesIO()
        pq.write_table(table.slice(start, shard_size), buffer)
        if not path.is_file() or path.read_bytes() != buffer.getvalue():
            with atomic_path(path) as temp:
                temp.write_bytes(buffer.getvalue())
        shards.append(path)
    current = {shard.parent.name for shard in shards}
    for stale in folder.iterdir():
        if stale.is_dir() and stale.name not in current:
            shutil.rmtree(stale)
    return shards


@flow(name="build_pairs", log_prints=True)
def build_pairs_flow(parameters: BuildPairsParameters) -> dict:
    """Filter the annotations, fetch the images and build the synthetic training pairs."""
    logger = get_run_logger()
    funnel = filter_task(parameters.filter_config())
    create_table_artifact(
        key="filter-funnel",
        table=[{"rule": rule, "boxes removed": funnel.removed[rule]} for rule in RULE_ORDER]
        + [{"rule": "subjects", "boxes removed": funnel.subjects}],
        description=f"{funnel.rows_read:,} rows and {funnel.images_read:,} images read",
    )
    fetched = fetch_task(parameters.fetch_config())

    shards = write_shards(parameters.data / "subjects" / "subjects.parquet", parameters.data / "shards",
                          parameters.shard_size)
    progress = create_progress_artifact(progress=0.0, key="build-progress", description="shards built")
    with gpu_slot("build_pairs") if parameters.uses_gpu() else nullcontext():
        for done, shard in enumerate(shards, start=1):
            build_task(parameters.build_config(shard, manifests=shard.parent))
            update_progress_artifact(progress, progress=100.0 * done / len(shards))
            logger.info("shard %d of %d built", done, len(shards))
    # Every shard is in the journal now: this writes the manifests of all of them, computing nothing.
    summary = build_pairs(parameters.build_config(parameters.data / "subjects" / "subjects.parquet"))
    catalog = catalog_task(parameters.catalog_config())

    rejects = "\n".join(f"| {reason} | {count} |" for reason, count in summary.rejects.most_common()) or "| none | 0 |"
    stages = " | ".join(f"{stage} {seconds:.2f} s" for stage, seconds in summary.seconds_per_stage.items())
    create_markdown_artifact(
        key="build-pairs-summary",
        markdown=(
            f"# build_pairs\n\n- subjects: {funnel.subjects:,} of {funnel.images_read:,} images\n"
            f"- images fetched: {fetched.fetched:,} (already present: {fetched.skipped:,})\n"
            f"- pairs: {summary.pairs:,}\n- mean seconds per pair: {stages}\n"
            f"- pairs manifest: `{parameters.data / 'pairs.parquet'}`\n"
            f"- catalog: FiftyOne dataset `{catalog.dataset}` ({catalog.pairs:,} pairs, {catalog.rejects:,} rejected, "
            f"{catalog.added:,} added by this run); open it with `{catalog.app_command()}`\n\n"
            f"| reject | subjects |\n| --- | ---: |\n{rejects}\n"
        ),
    )
    # Last, once everything stands: a failed build starts no pre-training.
    emit_pairs_built(parameters.data, summary.pairs, funnel.subjects, catalog.dataset)
    return {"subjects": funnel.subjects, "fetched": fetched.fetched, "pairs": summary.pairs,
            "rejects": sum(summary.rejects.values()), "dataset": catalog.dataset}
