"""``blipdiff score``: DreamBench's metrics for images made by any method, and the real-photo oracle.

Generated images come as ``DIR/<subject>/<prompt index 00-24>_<image index>.<png|jpg>`` or as a
``DIR/generations.parquet`` with ``subject``, ``prompt_index``, ``image_index`` and ``path`` (relative to
DIR or absolute), so DreamBooth's images or any other method's are scored by the same code as blipdiff's.
Per image: DINO and CLIP-I averaged over every real photo of its subject, CLIP-T against its prompt's
text (the DreamBench prompt with the identifier removed). A subject's score is the mean over its images;
the benchmark's, the mean over subjects (the pooled mean over all images is reported too).

The oracle (``--oracle``) scores the real photos against each other, self-pairs excluded: the paper's
0.774 (DINO) and 0.885 (CLIP-I) are the canary a user with the real metric weights checks.

Outputs: ``RUN/scores.parquet`` (subject, class, prompt_index, image_index, prompt, kind, path, dino, clip_i,
clip_t; for the oracle, one row per subject with dino and clip_i) and ``RUN/summary.json``, both atomic.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from blipdiff.infra.atomic import atomic_path, write_json_atomic
from blipdiff.models import DEFAULT_CLIP, DEFAULT_DINO
from blipdiff.models.devices import AUTO, DEVICE_HELP, resolve_device

IMAGE_NAME = re.compile(r"^(?P<prompt>\d{2})_(?P<image>\d+)\.(png|jpg|jpeg)$", re.IGNORECASE)
METRICS = ("dino", "clip_i", "clip_t")


class ScoreConfig(BaseModel):
    """One ``blipdiff score`` run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dreambench: Path = Field(description="DreamBench's dataset folder (DreamBooth's layout).")
    out: Path = Field(description="Folder for scores.parquet and summary.json.")
    images: Path | None = Field(None, description="Generated images: DIR/<subject>/<prompt index>_<image index>.png, "
                                "or DIR/generations.parquet.")
    oracle: bool = Field(False, description="Score the real photos against each other instead.")
    dino: str = Field(DEFAULT_DINO, description="DINO ViT-S/16: hub id or folder.")
    clip: str = Field(DEFAULT_CLIP, description="CLIP ViT-B/32: hub id or folder.")
    batch_size: int = Field(64, ge=1, description="Images per metric-model call.")
    device: str = Field(AUTO, description=DEVICE_HELP)

    @model_validator(mode="after")
    def _images_or_oracle(self) -> ScoreConfig:
        if (self.images is None) == (not self.oracle):
            raise ValueError("give --images DIR (generated images) or --oracle (the real photos), not both or neither")
        if self.images is not None and not self.images.is_dir():
            raise ValueError(f"{self.images}: no such folder")
        return self


def generated_images(folder: Path, bench) -> list[dict]:
    """The generated images of ``folder`` with their subject, prompt and image index; anything that does not
    fit DreamBench is an error naming it."""
    manifest = folder / "generations.parquet"
    if manifest.is_file():
        import pandas as pd

        frame = pd.read_parquet(manifest)
        missing = {"subject", "prompt_index", "image_index", "path"} - set(frame.columns)
        if missing:
            raise ValueError(f"{manifest} lacks the columns {', '.join(sorted(missing))}")
        rows = [{"subject": str(row.subject), "prompt_index": int(row.prompt_index), "image_index": int(row.image_index),
                 "path": (folder / row.path) if not Path(row.path).is_absolute() else Path(row.path)}
                for row in frame.itertuples()]
    else:
        rows, strays = [], []
        for subject_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
            for path in sorted(p for p in subject_folder.iterdir() if p.is_file()):
                match = IMAGE_NAME.match(path.name)
                if match is None:
                    strays.append(str(path.relative_to(folder)))
                    continue
                rows.append({"subject": subject_folder.name, "prompt_index": int(match["prompt"]),
                             "image_index": int(match["image"]), "path": path})
        if strays:
            raise ValueError(f"{folder}: not named <prompt index>_<image index>.png: {', '.join(strays[:5])}"
                             + (f" and {len(strays) - 5} more" if len(strays) > 5 else ""))
    if not rows:
        raise ValueError(f"{folder}: no generated images (DIR/<subject>/<NN>_<K>.png, or generations.parquet)")
    known = {subject.name for subject in bench.subjects}
    unknown = sorted({row["subject"] for row in rows} - known)
    if unknown:
        raise ValueError(f"{folder}: subjects that DreamBench does not have: {', '.join(unknown)}")
    out_of_range = [row for row in rows if not 0 <= row["prompt_index"] < 25]
    if out_of_range:
        raise ValueError(f"{out_of_range[0]['path']}: prompt index {out_of_range[0]['prompt_index']} is not 0-24")
    absent = [row["path"] for row in rows if not row["path"].is_file()]
    if absent:
        raise ValueError(f"missing images: {', '.join(map(str, absent[:5]))}")
    return rows


def _open(paths) -> list:
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def score_images(rows: list[dict], bench, dino, clip, log: Callable[[str], None] = print) -> list[dict]:
    """Each row with its prompt and DINO, CLIP-I and CLIP-T, subject by subject (real photos embedded once)."""
    from blipdiff.models.metrics import mean_similarity, text_similarity

    scored = []
    for subject in bench.subjects:
        mine = [row for row in rows if row["subject"] == subject.name]
        if not mine:
            continue
        prompts = bench.prompts(subject)
        real = _open(subject.photos)
        generated = _open(row["path"] for row in mine)
        texts = [prompts[row["prompt_index"]].text for row in mine]
        dino_scores = mean_similarity(dino(generated), dino(real))
        clip_generated = clip.images(generated)
        clip_i = mean_similarity(clip_generated, clip.images(real))
        clip_t = text_similarity(clip_generated, clip.texts(texts))
        for row, text, d, i, t in zip(mine, texts, dino_scores.tolist(), clip_i.tolist(), clip_t.tolist()):
            scored.append({"subject": subject.name, "class": subject.class_name,
                           "prompt_index": row["prompt_index"], "image_index": row["image_index"], "prompt": text,
                           "kind": prompts[row["prompt_index"]].kind, "path": str(Path(row["path"]).resolve()),
                           "dino": d, "clip_i": i, "clip_t": t})
        log(f"{subject.name}: {len(mine)} images scored")
    return scored


def summarize(scores: list[dict], metrics: tuple[str, ...] = METRICS) -> dict:
    """Per-subject means, their mean (the benchmark's score) and the pooled mean over all rows."""
    import pandas as pd

    frame = pd.DataFrame(scores)
    per_subject = frame.groupby("subject")[list(metrics)].mean()
    return {"subjects": len(per_subject), "images": len(frame),
            "mean_over_subjects": {metric: float(per_subject[metric].mean()) for metric in metrics},
            "pooled_mean": {metric: float(frame[metric].mean()) for metric in metrics},
            "per_subject": {subject: {metric: float(value) for metric, value in row.items()}
                            for subject, row in per_subject.iterrows()}}


def oracle_scores(bench, dino, clip, log: Callable[[str], None] = print) -> list[dict]:
    """Per subject: DINO and CLIP-I over every pair of different real photos."""
    from blipdiff.models.metrics import oracle_similarity

    rows = []
    for subject in bench.subjects:
        if len(subject.photos) < 2:
            log(f"{subject.name}: one photo, no oracle")
            continue
        real = _open(subject.photos)
        rows.append({"subject": subject.name, "class": subject.class_name, "photos": len(real),
                     "dino": oracle_similarity(dino(real)), "clip_i": oracle_similarity(clip.images(real))})
    return rows


def run_score(config: ScoreConfig, log: Callable[[str], None] = print) -> dict:
    """Score, then write ``scores.parquet`` and ``summary.json`` into ``config.out``; return the summary."""
    import pandas as pd
    import torch

    from blipdiff.datasets.dreambench import read_dreambench
    from blipdiff.models.metrics import ClipEmbedder, DinoEmbedder

    bench = read_dreambench(config.dreambench)
    rows = None if config.oracle else generated_images(config.images, bench)
    device = resolve_device(config.device)
    dino = DinoEmbedder(config.dino, device, config.batch_size)
    clip = ClipEmbedder(config.clip, device, config.batch_size)
    if config.oracle:
        scores = oracle_scores(bench, dino, clip, log)
        summary = {"oracle": True, **summarize(scores, ("dino", "clip_i")), "paper": {"dino": 0.774, "clip_i": 0.885}}
    else:
        scores = score_images(rows, bench, dino, clip, log)
        summary = {"oracle": False, "images_folder": str(config.images.resolve()), **summarize(scores)}
    summary["models"] = {"dino": config.dino, "clip": config.clip}
    config.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(config.out / "scores.parquet") as temp:
        pd.DataFrame(scores).to_parquet(temp, index=False)
    write_json_atomic(summary, config.out / "summary.json")
    return summary
