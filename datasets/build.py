"""Subject extraction: each subject image becomes (synthetic input, original target, caption).

For every subject: decode (content decides the format, EXIF orientation, 8-bit RGB, limits, the aspect
rule re-checked in pixels), caption, segment, trimap, closed-form matte with foreground estimation, and
a composite over a background drawn deterministically from (seed, image id). The model stages run as
Ray Data `map_batches` over actor pools, so each model loads once per actor; decoding and the matting
and compositing stage run as Ray tasks. Every finished subject (a pair or a reject) is appended to
``OUT/journal.jsonl`` as it arrives, after its files were written atomically: a rerun, or a run after a
crash, skips it. ``pairs.parquet`` and ``rejects.parquet`` are rebuilt from the journal at the end.
"""

from __future__ import annotations

import os
import pickle
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from blipdiff.datasets.configs import BuildConfig
from blipdiff.datasets.compose import background_for, list_backgrounds
from blipdiff.datasets.matting import (
    TRIMAP_UNKNOWN,
    MattingError,
    box_in_pixels,
    composite,
    make_trimap,
    pull_matte,
)
from blipdiff.datasets.subjects import read_subjects
from blipdiff.infra.atomic import atomic_path, remove_stale_temporaries
from blipdiff.infra.images import DecodeFailure, decode_image
from blipdiff.infra.journal import JOURNAL_NAME, Journal
from blipdiff.infra.ray_cluster import connect_ray
from blipdiff.infra.run_folder import claim_run_folder, record_run_folder

STAGES = ("decode", "caption", "segment", "trimap", "matte", "composite")
IMAGE_KINDS = {"target": ".jpg", "composite": ".jpg", "input": ".jpg", "alpha": ".png", "trimap": ".png"}
SETTINGS = "build.json"
PAIR_FIELDS = [
    ("image_id", pa.string()), ("label_mid", pa.string()), ("label_name", pa.string()),
    ("caption", pa.string()), ("captions", pa.list_(pa.string())), ("width", pa.int32()), ("height", pa.int32()),
    ("box_x0", pa.int32()), ("box_y0", pa.int32()), ("box_x1", pa.int32()), ("box_y1", pa.int32()),
    *((f"{kind}_path", pa.string()) for kind in IMAGE_KINDS),
    ("background", pa.string()), ("background_crop", pa.list_(pa.int32())),
    ("foreground_fraction", pa.float64()), ("unknown_fraction", pa.float64()),
    *((f"{stage}_seconds", pa.float64()) for stage in STAGES),
]
PAIRS_SCHEMA = pa.schema(PAIR_FIELDS)
REJECTS_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("label_mid", pa.string()), ("label_name", pa.string()),
    ("source_path", pa.string()), *((edge, pa.float64()) for edge in ("x_min", "x_max", "y_min", "y_max")),
    ("stage", pa.string()), ("reason", pa.string()),
])


@dataclass
class BuildSummary:
    pairs: int
    rejects: Counter
    skipped: int
    seconds_per_stage: dict[str, float]


def image_paths(images: Path, ids: list[str]) -> dict[str, Path]:
    """Each id's file: from a fetch folder's images.parquet, else ``images/{image_id}.jpg``."""
    manifest = Path(images) / "images.parquet"
    if manifest.is_file():
        table = pq.read_table(manifest, columns=["image_id", "path"]).to_pydict()
        known = dict(zip(table["image_id"], table["path"], strict=True))
        return {i: Path(images) / known[i] if i in known else Path(images) / f"{i}.jpg" for i in ids}
    return {i: Path(images) / f"{i}.jpg" for i in ids}


def relative_path(kind: str, image_id: str) -> str:
    """Where a pair's image of ``kind`` lives inside the build folder."""
    return f"{kind}/{image_id[:2]}/{image_id}{IMAGE_KINDS[kind]}"


def _reject(row: dict, stage: str, reason: str) -> dict:
    return {
        "image_id": row["image_id"], "label_mid": row["label_mid"], "label_name": row["label_name"],
        "source_path": os.path.abspath(row["path"]), **{edge: row[edge] for edge in ("x_min", "x_max", "y_min", "y_max")},
        "reject_stage": stage, "reject_reason": reason,
    }


def decode_subject(row: dict, config: BuildConfig) -> dict:
    """Decode stage: pixels, or a reject; the aspect rule is re-checked in pixels."""
    started = time.perf_counter()
    try:
        pixels = decode_image(Path(row["path"]), config.max_pixels)
    except DecodeFailure as failure:
        return _reject(row, "decode", str(failure))
    height, width = pixels.shape[:2]
    box_width = (row["x_max"] - row["x_min"]) * width
    box_height = (row["y_max"] - row["y_min"]) * height
    if box_width <= 0 or box_height <= 0:
        return _reject(row, "decode", "the subject's box is empty")
    aspect = max(box_width / box_height, box_height / box_width)
    if aspect > config.max_aspect:
        return _reject(row, "decode", f"box aspect {aspect:.2f} in pixels exceeds {config.max_aspect:g}")
    return {**row, "pixels": pixels, "decode_seconds": time.perf_counter() - started}


def finish_subject(row: dict, config: BuildConfig, backgrounds: list[Path]) -> dict:
    """Trimap, matte, composite, and every image file of the pair, written atomically."""
    image_id, pixels, probabilities = row["image_id"], row["pixels"], row["probabilities"]
    height, width = pixels.shape[:2]
    box_px = box_in_pixels((row["x_min"], row["x_max"], row["y_min"], row["y_max"]), width, height)
    seconds = {stage: row[f"{stage}_seconds"] for stage in ("decode", "caption", "segment")}

    started = time.perf_counter()
    try:
        trimap = make_trimap(probabilities, box_px, config.trimap)
    except MattingError as error:
        return _reject(row, "trimap", str(error))
    seconds["trimap"] = time.perf_counter() - started

    started = time.perf_counter()
    try:
        alpha, foreground = pull_matte(pixels, trimap, config.matting)
    except MattingError as error:
        return _reject(row, "matte", str(error))
    seconds["matte"] = time.perf_counter() - started

    started = time.perf_counter()
    try:
        background, choice = background_for(backgrounds, config.seed, image_id, width, height)
    except DecodeFailure as failure:
        return _reject(row, "composite", str(failure))
    blended = composite(foreground, alpha, background)
    x0, y0, x1, y1 = box_px
    images = {
        "target": pixels,
        "composite": blended,
        "input": blended[y0:y1, x0:x1],
        "alpha": np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8),
        "trimap": trimap,
    }
    for kind, image in images.items():
        _write_image(config.out / relative_path(kind, image_id), image, config.jpeg_quality)
    seconds["composite"] = time.perf_counter() - started

    return {
        "image_id": image_id, "label_mid": row["label_mid"], "label_name": row["label_name"],
        "caption": row["caption"], "captions": list(row["captions"]), "width": width, "height": height,
        "box_x0": x0, "box_y0": y0, "box_x1": x1, "box_y1": y1,
        **{f"{kind}_path": relative_path(kind, image_id) for kind in IMAGE_KINDS},
        "background": choice.name, "background_crop": [choice.x, choice.y, choice.width, choice.height],
        "foreground_fraction": float(alpha.mean()),
        "unknown_fraction": float((trimap == TRIMAP_UNKNOWN).mean()),
        **{f"{stage}_seconds": float(value) for stage, value in seconds.items()},
    }


def _write_image(path: Path, image: np.ndarray, jpeg_quality: int) -> None:
    if image.ndim == 3:
        image = image[..., ::-1]
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if path.suffix == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, encoded = cv2.imencode(path.suffix, np.ascontiguousarray(image), params)
    if not ok:
        raise OSError(f"cannot encode {path}")
    with atomic_path(path) as temp:
        temp.write_bytes(encoded.tobytes())


class ModelStage:
    """A Ray Data batch stage around one model: built once per actor (per batch when weight-free),
    applied to the batch's live rows; a model error rejects every live row of the batch."""

    stage: str
    errors: tuple[type[Exception], ...]

    def __init__(self, config: BuildConfig):
        self.model = self.load(config)

    @staticmethod
    def uses_weights(config: BuildConfig) -> bool:
        raise NotImplementedError

    def load(self, config: BuildConfig):
        raise NotImplementedError

    def apply(self, rows: list[dict]) -> list[dict]:
        """The fields this stage adds to each row."""
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        rows = _rows(batch)
        live = [i for i, row in enumerate(rows) if "reject_stage" not in row]
        started = time.perf_counter()
        try:
            added = self.apply([rows[i] for i in live])
        except self.errors as error:
            for i in live:
                rows[i] = _reject(rows[i], self.stage, f"{type(error).__name__}: {error}")
            return _batch(rows)
        each = (time.perf_counter() - started) / max(len(live), 1)
        for i, fields in zip(live, added, strict=True):
            rows[i] = {**rows[i], **fields, f"{self.stage}_seconds": each}
        return _batch(rows)


class CaptionStage(ModelStage):
    stage = "caption"
    errors = (RuntimeError, ValueError)

    @staticmethod
    def uses_weights(config: BuildConfig) -> bool:
        return config.captioner != "template"

    def load(self, config: BuildConfig):
        from blipdiff.models.captioners import make_captioner

        if config.captioner == "template":
            return make_captioner("template")
        return make_captioner(
            "blip2", model=config.caption_model, batch_size=config.model_batch_size,
            num_captions=config.num_captions, top_p=config.top_p, min_length=config.min_caption_length,
            keep=config.keep_captions, clip_model=config.clip_model, seed=config.seed, device=config.device,
        )

    def apply(self, rows: list[dict]) -> list[dict]:
        results = self.model.caption([row["pixels"] for row in rows], [row["label_name"] for row in rows])
        return [{"caption": result.caption, "captions": list(result.kept)} for result in results]


class SegmentStage(ModelStage):
    stage = "segment"
    errors = (RuntimeError, ValueError, cv2.error)

    @staticmethod
    def uses_weights(config: BuildConfig) -> bool:
        return config.segmenter != "grabcut"

    def load(self, config: BuildConfig):
        from blipdiff.models.segmenters import make_segmenter

        if config.segmenter == "grabcut":
            return make_segmenter("grabcut", seed=config.seed)
        return make_segmenter("clipseg", model=config.segment_model, batch_size=config.model_batch_size,
                              device=config.device)

    def apply(self, rows: list[dict]) -> list[dict]:
        maps = self.model.probabilities(
            [row["pixels"] for row in rows], [row["label_name"] for row in rows],
            [(row["x_min"], row["x_max"], row["y_min"], row["y_max"]) for row in rows],
        )
        return [{"probabilities": probabilities.astype(np.float32, copy=False)} for probabilities in maps]


# Rows travel through Ray Data as one pickled column: images of every size, maps and captions stay
# opaque to Arrow, which would otherwise try to infer (and reshape) a schema for them.
def _pack(row: dict) -> bytes:
    return pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)


def _rows(batch: dict) -> list[dict]:
    return [pickle.loads(item) for item in batch["payload"]]


def _batch(rows: list[dict]) -> dict:
    payload = np.empty(len(rows), dtype=object)
    payload[:] = [_pack(row) for row in rows]
    return {"payload": payload}


def _settings_guard(config: BuildConfig) -> None:
    """A data folder holds one build's pairs (it is filled in place, beside subjects/ and images/)."""
    if not claim_run_folder(config.out, config.fingerprint(), record=SETTINGS, other="a build made", run="build",
                            must_be_new=False, advice="use a new --out folder so that two builds never mix"):
        record_run_folder(config.out, config.fingerprint(), SETTINGS)


def run_pipeline(config: BuildConfig, rows: list[dict], backgrounds: list[Path],
                 on_done: Callable[[dict], None]) -> None:
    """Decode → caption → segment → finish, on Ray; ``on_done`` gets each finished row as it arrives."""
    import ray

    connect_ray()

    def decode(row: dict) -> dict:
        return {"payload": _pack(decode_subject(pickle.loads(row["payload"]), config))}

    def finish(row: dict) -> dict:
        item = pickle.loads(row["payload"])
        if "reject_stage" not in item:
            item = finish_subject(item, config, backgrounds)
        return {"payload": _pack(item)}

    def stage(dataset, stage_class: type[ModelStage]):
        if stage_class.uses_weights(config):
            # A model loads once per actor; actors take a fraction of a CPU so that they never starve tasks.
            return dataset.map_batches(
                stage_class, fn_constructor_args=(config,), batch_size=config.model_batch_size,
                batch_format="numpy", num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor or None,
                compute=ray.data.ActorPoolStrategy(size=config.actors),
            )
        # Weight-free stages cost nothing to build: plain tasks, as many as the CPUs allow, no GPU.
        return dataset.map_batches(lambda batch: stage_class(config)(batch), batch_size=config.model_batch_size,
                                   batch_format="numpy")

    items = ray.data.from_items([{"payload": _pack(row)} for row in rows], override_num_blocks=max(1, min(len(rows), 64)))
    dataset = stage(stage(items.map(decode), CaptionStage), SegmentStage).map(finish)
    for row in dataset.iter_rows():
        on_done(pickle.loads(row["payload"]))


def build_pairs(config: BuildConfig, progress: Callable[[int, int], None] | None = None) -> BuildSummary:
    """Build every subject's pair into ``config.out``; finished subjects of earlier runs are skipped."""
    subjects = read_subjects(config.subjects)
    backgrounds = list_backgrounds(config.backgrounds)
    config.out.mkdir(parents=True, exist_ok=True)
    _settings_guard(config)
    # A killed run's half-written files: images, and the manifests.
    for kind in IMAGE_KINDS:
        remove_stale_temporaries(config.out / kind, below="*/")
    remove_stale_temporaries(config.out)
    remove_stale_temporaries(config.manifest_folder)
    journal = Journal(config.out / JOURNAL_NAME)
    finished = {entry["image_id"]: entry for entry in journal.load() if "image_id" in entry}
    wanted = subjects[~subjects["image_id"].duplicated()]
    paths = image_paths(config.images, list(wanted["image_id"]))
    rows = [
        {**record, "path": str(paths[record["image_id"]])}
        for record in wanted.to_dict("records")
        if record["image_id"] not in finished or not _files_present(config.out, finished[record["image_id"]])
    ]
    skipped = len(wanted) - len(rows)
    done = 0

    def on_done(entry: dict) -> None:
        nonlocal done
        journal.append(entry)
        finished[entry["image_id"]] = entry
        done += 1
        if progress is not None:
            progress(done, len(rows))

    if rows:
        run_pipeline(config, rows, backgrounds, on_done)
    entries = [finished[i] for i in sorted(set(wanted["image_id"]) & set(finished))]
    return _write_outputs(config.manifest_folder, entries, skipped)


def _files_present(out: Path, entry: dict) -> bool:
    if "reject_stage" in entry:
        return True
    return all((out / entry[f"{kind}_path"]).is_file() for kind in IMAGE_KINDS)


def _write_outputs(folder: Path, entries: list[dict], skipped: int) -> BuildSummary:
    pairs = [e for e in entries if "reject_stage" not in e]
    rejects = [{**e, "stage": e["reject_stage"], "reason": e["reject_reason"]} for e in entries if "reject_stage" in e]
    for name, rows, schema in (("pairs.parquet", pairs, PAIRS_SCHEMA), ("rejects.parquet", rejects, REJECTS_SCHEMA)):
        table = pa.Table.from_pylist([{f.name: row[f.name] for f in schema} for row in rows], schema=schema)
        with atomic_path(folder / name) as temp:
            pq.write_table(table, temp)
    seconds = {stage: float(np.mean([p[f"{stage}_seconds"] for p in pairs])) if pairs else 0.0 for stage in STAGES}
    return BuildSummary(
        pairs=len(pairs), rejects=Counter(f"{r['stage']}: {r['reason']}" for r in rejects), skipped=skipped,
        seconds_per_stage=seconds,
    )
