"""Pre-training samples from built pairs, as the authors made them, each one a pure function of its place
in the run.

The pairs of every build folder whose input photo and cached target latents exist become the training
records (the others are counted by reason and skipped); a few, chosen by the seed, are held out for the
validation images. The records are shuffled anew each epoch by (seed, epoch), and the sample at global
position ``p`` (the p-th sample the run consumes, over all workers) draws every random choice it needs
from a counter-based generator keyed by (seed, p): the input crop and flip, the caption, the latent
sample, the noise, the timestep and the subject dropout. So a resumed run, or the same global batch
split over another number of workers, sees exactly the same samples.

Input: the pair's ``input`` photo (the subject's box crop of the composite), RandomResizedCrop(size,
scale 0.9-1.0, bicubic), a horizontal flip with probability 0.5 and the checkpoint's normalisation.
Target: a draw from the cached VAE posterior of the original photo, times the VAE's scaling factor.
Text: ``"{caption}, the {label} is"``; the subject text is the label.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from blipdiff.datasets.latents import ENCODED, MANIFEST

RECORDS_SCHEMA = pa.schema([("image_id", pa.string()), ("label", pa.string()), ("captions", pa.list_(pa.string())),
                            ("input_path", pa.string()), ("latent_path", pa.string())])


def caption_text(caption: str, label: str) -> str:
    """The authors' training text; the subject embeddings go just before its end token."""
    return f"{caption}, the {label} is"


def collect_records(pair_folders: list[tuple[Path, Path]]) -> tuple[pa.Table, Counter]:
    """(build folder, its latent cache folder) pairs → the usable records, and the skipped ones by reason."""
    rows, skipped = [], Counter()
    for pairs, latents in pair_folders:
        table = pq.read_table(pairs / "pairs.parquet", columns=["image_id", "label_name", "caption", "captions",
                                                                "input_path"])
        manifest = pq.read_table(latents / MANIFEST).to_pylist()
        status = {row["image_id"]: row for row in manifest}
        for pair in table.to_pylist():
            latent = status.get(pair["image_id"])
            if latent is None or latent["status"] != ENCODED:
                skipped[f"no latents ({latent['status'] if latent else 'not encoded'})"] += 1
                continue
            input_path, latent_path = pairs / pair["input_path"], pairs / latent["path"]
            if not input_path.is_file():
                skipped["missing input file"] += 1
                continue
            if not latent_path.is_file():
                skipped["missing latent file"] += 1
                continue
            captions = [caption for caption in (pair["captions"] or [pair["caption"]]) if caption]
            rows.append({"image_id": pair["image_id"], "label": pair["label_name"], "captions": captions or [""],
                         "input_path": str(input_path.resolve()), "latent_path": str(latent_path.resolve())})
    rows.sort(key=lambda row: (row["image_id"], row["input_path"]))
    return pa.Table.from_pylist(rows, schema=RECORDS_SCHEMA), skipped


def split_validation(records: pa.Table, count: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """(training, held out): ``count`` records chosen by the seed leave the training set."""
    if count and records.num_rows <= count:
        raise ValueError(f"{records.num_rows} usable pairs: too few to hold {count} out for validation and train on "
                         "the rest (build more pairs, or lower --validation-pairs)")
    held = np.sort(np.random.default_rng([seed, 1]).choice(records.num_rows, size=count, replace=False))
    kept = np.setdiff1d(np.arange(records.num_rows), held)
    return records.take(kept), records.take(held)


@functools.lru_cache(maxsize=4)
def _record_table(path: str, mtime_ns: int) -> pa.Table:
    return pq.read_table(path)


def record_table(path: Path) -> pa.Table:
    """The records file, read once per process (each Ray worker process keeps it) and kept in Arrow's
    columns: a million records as Python dicts would cost every process gigabytes."""
    return _record_table(str(path), path.stat().st_mtime_ns)


def read_records(path: Path) -> list[dict]:
    return record_table(path).to_pylist()


@functools.lru_cache(maxsize=2)
def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 2, epoch]).permutation(count)


@dataclass(frozen=True)
class SampleRecipe:
    """What every sample needs besides its record and position."""

    seed: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scaling_factor: float
    num_train_timesteps: int
    subject_dropout: float = 0.15
    crop_scale: tuple[float, float] = (0.9, 1.0)


def sample_randomness(seed: int, position: int) -> np.random.Generator:
    """The generator of the sample at ``position``: Philox keyed by (seed, position), independent of
    which worker makes it and in what order."""
    return np.random.Generator(np.random.Philox(key=[seed, position]))


def random_resized_crop(image, size: int, scale: tuple[float, float], rng: np.random.Generator):
    """torchvision's RandomResizedCrop (ratio 3/4 to 4/3, ten tries, then the centre), bicubic, drawn from
    ``rng``: written here so that it is keyed like every other draw of the sample, and without torchvision."""
    from PIL import Image

    width, height = image.size
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            break
    else:
        aspect = width / height
        if aspect < 3 / 4:
            w, h = width, round(width / (3 / 4))
        elif aspect > 4 / 3:
            h, w = height, round(height * (4 / 3))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))


def make_sample(record: dict, position: int, recipe: SampleRecipe) -> dict:
    """The training sample at global ``position`` of the run, from its record."""
    from PIL import Image

    from blipdiff.datasets.latents import read_latent

    rng = sample_randomness(recipe.seed, position)
    with Image.open(record["input_path"]) as image:
        crop = random_resized_crop(image.convert("RGB"), recipe.image_size, recipe.crop_scale, rng)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = (np.asarray(crop, dtype=np.float32) / 255.0 - np.asarray(recipe.mean, np.float32)) / \
        np.asarray(recipe.std, np.float32)
    mean, std = (tensor.numpy() for tensor in read_latent(Path(record["latent_path"])))
    latents = (mean + std * rng.standard_normal(mean.shape, dtype=np.float32)) * recipe.scaling_factor
    captions = record["captions"]
    return {
        "pixel_values": pixels.transpose(2, 0, 1).copy(),
        "latents": latents.astype(np.float32),
        "noise": rng.standard_normal(mean.shape, dtype=np.float32),
        "timestep": int(rng.integers(0, recipe.num_train_timesteps)),
        "keep_subject": bool(rng.random() >= recipe.subject_dropout),
        "text": caption_text(captions[int(rng.integers(0, len(captions)))], record["label"]),
        "subject": record["label"],
        "position": position,
    }


def record_at(records: pa.Table, position: int, seed: int) -> dict:
    """The record the run reads at global ``position``: epoch after epoch, each shuffled by (seed, epoch)."""
    epoch, offset = divmod(position, records.num_rows)
    return records.slice(int(epoch_order(records.num_rows, seed, epoch)[offset]), 1).to_pylist()[0]


@dataclass(frozen=True)
class WorkerSchedule:
    """Which global positions one worker reads, step by step: global step s covers positions
    s·G .. s·G + G - 1 (G = workers × batch × accumulation), micro-batch a of worker r the B positions
    from s·G + a·W·B + r·B. The same global batch splits the same way over any number of workers."""

    rank: int
    workers: int
    batch_size: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.workers * self.batch_size * self.accumulation

    def positions(self, first_step: int, indices: np.ndarray) -> np.ndarray:
        """Global positions of this worker's rows ``indices`` (0, 1, ... counted from ``first_step``)."""
        per_step = self.batch_size * self.accumulation
        step = first_step + indices // per_step
        micro, row = (indices // self.batch_size) % self.accumulation, indices % self.batch_size
        return (step * self.global_batch + micro * self.workers * self.batch_size + self.rank * self.batch_size + row)


def make_samples(batch: dict, records_path: str, schedule: WorkerSchedule, first_step: int,
                 recipe: SampleRecipe) -> dict:
    """A Ray Data ``map_batches`` function: this worker's row indices → its samples, in order."""
    records = record_table(Path(records_path))
    positions = schedule.positions(first_step, np.asarray(batch["id"], dtype=np.int64))
    samples = [make_sample(record_at(records, int(p), recipe.seed), int(p), recipe) for p in positions]
    return {key: np.stack([s[key] for s in samples]) if isinstance(samples[0][key], np.ndarray)
            else np.asarray([s[key] for s in samples]) for key in samples[0]}
