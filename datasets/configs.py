"""The data stages' configurations: what a run of filter, fetch, build (with its trimap and matting
settings), catalog and encode-latents takes. Light to import (pydantic only), so that the CLI reads its
options' help and defaults from these fields without loading the stages' libraries; the stages' modules
import them back, so their old names still resolve."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from blipdiff.infra.images import DEFAULT_MAX_PIXELS, MAX_DECODABLE_PIXELS
from blipdiff.infra.inputs import BuildFolder, ImageSide
from blipdiff.models import DEFAULT_BLIP2, DEFAULT_CLIPSEG
from blipdiff.models.devices import AUTO, DEVICE_HELP
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_BLOCK_BYTES, DEFAULT_MEMORY_LIMIT = 4 << 20, "400MB"
DEFAULT_URL_TEMPLATE = "https://open-images-dataset.s3.amazonaws.com/{split}/{image_id}.jpg"


class FilterRules(BaseModel):
    """Thresholds and class lists of the subject filter; defaults are the paper's."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_aspect: float = Field(gt=1.0)
    min_area: float = Field(ge=0.0, le=1.0)
    max_area: float = Field(ge=0.0, le=1.0)
    human_classes: dict[str, str]
    cluttered_classes: dict[str, str]

    @model_validator(mode="after")
    def _area_bounds_ordered(self) -> FilterRules:
        if self.min_area > self.max_area:
            raise ValueError(f"min_area {self.min_area} exceeds max_area {self.max_area}")
        return self

    @classmethod
    def from_toml(cls, path: Path) -> FilterRules:
        try:
            return cls.model_validate(tomllib.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ValueError(f"cannot read rules file {path}: {error}") from error

    @classmethod
    def paper_defaults(cls) -> FilterRules:
        return cls.from_toml(Path(__file__).with_name("rules") / "openimages_v6.toml")


class FilterConfig(BaseModel):
    """Everything one run of the filter needs; shared by the CLI, the flows and the tests."""

    model_config = ConfigDict(extra="forbid")
    boxes: Path = Field(description="Open Images box annotations (.csv, .csv.gz or .parquet).")
    classes: Path = Field(description="Class descriptions: `MID,Name`, no header.")
    out: Path = Field(description="Folder for subjects.parquet and funnel.json.")
    rules: Path | None = Field(default=None, description="Rules TOML replacing the paper's thresholds and class lists.")
    block_bytes: int = Field(default=DEFAULT_BLOCK_BYTES, gt=0, description="CSV bytes the reader buffers")
    memory_limit: str = Field(default=DEFAULT_MEMORY_LIMIT, description="DuckDB's memory limit (e.g. 400MB, 2GB); it spills into OUT.")

    def load_rules(self) -> FilterRules:
        return FilterRules.from_toml(self.rules) if self.rules else FilterRules.paper_defaults()


class FetchConfig(BaseModel):
    """One fetch run; shared by the CLI, the flows and the tests."""

    model_config = ConfigDict(extra="forbid")

    subjects: Path = Field(description="Parquet with an image_id column (the filter's subjects.parquet).")
    out: Path = Field(description="Image folder: images/, images.parquet, rejects.parquet.")
    url_template: str = Field(default=DEFAULT_URL_TEMPLATE, description="URL with {image_id} and {split}.")
    split: str = Field(default="train", description="Open Images split that fills {split}.")
    images_csv: Path | None = Field(default=None, description="The dataset's images CSV: download its OriginalURL (md5-checked).")
    thumbnails: bool = Field(default=False, description="With --images-csv: Thumbnail300KURL instead.")
    from_dir: Path | None = Field(default=None, description="Ingest {image_id}.<ext> files from this folder.")
    timeout: float = Field(default=30.0, gt=0, description="Seconds to connect and between bytes.")
    retries: int = Field(default=3, ge=0, description="Retries after a 5xx, a timeout or a broken connection.")
    backoff: float = Field(default=1.0, ge=0, description="Seconds before the first retry, doubled each time.")
    workers: int = Field(default=16, ge=1, description="Downloads in flight (per Ray task on a cluster).")
    max_bytes: int = Field(default=64 << 20, gt=0, description="largest file accepted")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0, le=MAX_DECODABLE_PIXELS, description="largest image accepted (decompression bombs)")
    ray: bool | None = Field(default=None, description="Fan out through Ray (default: when RAY_ADDRESS is set).")
    ray_shard: int = Field(default=256, ge=1, description="images per Ray task")

    @model_validator(mode="after")
    def _consistent(self) -> FetchConfig:
        if self.images_csv is not None and self.from_dir is not None:
            raise ValueError("choose one source: --images-csv or --from-dir")
        if self.thumbnails and self.images_csv is None:
            raise ValueError("--thumbnails needs --images-csv")
        if "{image_id}" not in self.url_template:
            raise ValueError("--url-template must contain {image_id}")
        try:
            self.url_template.format(image_id="0" * 16, split=self.split)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"--url-template accepts only {{image_id}} and {{split}}: {error}") from error
        return self

    def use_ray(self) -> bool:
        return self.ray if self.ray is not None else bool(os.environ.get("RAY_ADDRESS"))


class TrimapConfig(BaseModel):
    """How a subject probability map becomes a trimap (background 0, unknown 128, foreground 255)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    high: float = Field(default=0.5, gt=0, le=1, description="Subject probability at or above: foreground.")
    low: float = Field(default=0.25, ge=0, lt=1, description="Subject probability below: background.")
    band: float = Field(
        default=0.02, ge=0, description="Unknown band on each side of the edge, as a fraction of the box's long side."
    )
    min_band_px: int = Field(default=2, ge=1, description="narrowest unknown band, in pixels")
    max_outside_box: float = Field(
        default=0.5, ge=0, le=1, description="reject when more of the foreground than this lies outside the box"
    )

    @model_validator(mode="after")
    def _ordered(self) -> TrimapConfig:
        if self.low > self.high:
            raise ValueError(f"trimap low threshold {self.low} exceeds high threshold {self.high}")
        return self


class MattingConfig(BaseModel):
    """Closed-form matting settings; the defaults are the measured ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    working_long_side: int | None = Field(
        default=512, gt=16, description="Long side at which the matte is solved, then scaled back to the image's size; unset: full resolution."
    )
    epsilon: float = Field(default=1e-7, gt=0, description="regularisation of the matting Laplacian")
    radius: int = Field(default=1, ge=1, description="window radius of the matting Laplacian")
    discard_threshold: float = Field(default=1e-2, gt=0, description="incomplete Cholesky drop tolerance")
    rtol: float = Field(default=3e-4, gt=0, description="relative residual at which conjugate gradients stop")
    coarse_start: bool = Field(default=True, description="start from a half-resolution solution")


class BuildConfig(BaseModel):
    """One build run; shared by the CLI, the flows and the tests."""

    model_config = ConfigDict(extra="forbid")

    subjects: Path = Field(description="The filter's subjects.parquet.")
    images: Path = Field(description="A fetch output folder, or a folder of {image_id}.jpg.")
    backgrounds: Path = Field(description="Folder of background photos.")
    out: Path = Field(description="Output folder: pairs.parquet, rejects.parquet, image files.")
    manifests: Path | None = Field(
        default=None, description="folder for pairs.parquet and rejects.parquet when not OUT (a shard's own)"
    )
    captioner: Literal["template", "blip2"] = Field("template", description="template (weight-free) or blip2.")
    caption_model: str = Field(default=DEFAULT_BLIP2, description="BLIP-2 hub id or local folder.")
    clip_model: str | None = Field(default=None, description="CLIP hub id or folder that ranks sampled captions.")
    num_captions: int = Field(default=1, ge=1, description="Captions sampled per image (the authors: 48).")
    top_p: float = Field(default=0.95, gt=0, le=1)
    min_caption_length: int = Field(default=5, ge=0)
    keep_captions: int = Field(default=5, ge=1)
    segmenter: Literal["grabcut", "clipseg"] = Field("grabcut", description="grabcut (weight-free) or clipseg.")
    segment_model: str = Field(default=DEFAULT_CLIPSEG, description="CLIPSeg hub id or local folder.")
    device: str = Field(AUTO, description=DEVICE_HELP)
    model_batch_size: int = Field(default=8, ge=1, description="Images per model call.")
    actors: int = Field(default=1, ge=1, description="Actors per model stage.")
    gpus_per_actor: float = Field(default=0.0, ge=0, description="GPUs per model actor.")
    cpus_per_actor: float = Field(default=0.5, gt=0, description="fractional, so model actors never starve tasks")
    trimap: TrimapConfig = TrimapConfig()
    matting: MattingConfig = MattingConfig()
    seed: int = Field(0, description="Seed of the background draws.")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0, le=MAX_DECODABLE_PIXELS)
    max_aspect: float = Field(default=2.0, gt=1)
    jpeg_quality: int = Field(default=95, ge=1, le=100)

    def fingerprint(self) -> dict:
        """The settings that decide the outputs: a folder never mixes two of them."""
        return self.model_dump(mode="json", exclude={"subjects", "images", "out", "manifests", "actors", "device",
                                                      "model_batch_size", "gpus_per_actor", "cpus_per_actor"})

    @property
    def manifest_folder(self) -> Path:
        return self.manifests if self.manifests is not None else self.out


class CatalogConfig(BaseModel):
    """One cataloguing run; shared by the CLI, the flow and the tests."""

    model_config = ConfigDict(extra="forbid")

    pairs: Path = Field(description="Build folder: pairs.parquet, rejects.parquet and the pairs' images.")
    dataset: str = Field(min_length=1, description="FiftyOne dataset name.")
    replace: bool = Field(default=False, description="Delete the dataset first, even if it catalogues another build.")


class EncodeLatentsConfig(BaseModel):
    """One ``blipdiff encode-latents`` run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pairs: BuildFolder = Field(description="Build folder (blipdiff build --out) with pairs.parquet.")
    model: str = Field(description="Hub id or local checkpoint folder whose vae/ encodes the targets.")
    resolution: ImageSide = Field(512, description="Side of the square targets.")
    batch_size: int = Field(8, ge=1, description="Targets per VAE call.")
    actors: int = Field(1, ge=1, description="VAE actors (one per GPU, say).")
    gpus_per_actor: float | None = Field(None, ge=0, description="GPUs per actor (default: 1 when the Ray cluster has GPUs, else 0).")
