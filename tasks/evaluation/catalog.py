"""The DreamBench catalog: every evaluation's generated images, with their scores, in one FiftyOne dataset.

One sample per generated image with the run (its id and folder), the model and its training step, the
mode, subject, class, prompt, prompt index and kind, seed set, seed, image index, DINO, CLIP-I and
CLIP-T, tagged ``generated``; the subjects' real photos once each, tagged ``reference``. Saved views:
the lowest DINO and the lowest CLIP-T first, per subject, by run (two runs side by side), the latest
run. The database records paths, not pixels.

Cataloguing a run mirrors its manifests: a run already catalogued as its files stand is left alone, one
whose samples differ (a rerun that finished more images) is replaced, so each image is in the dataset
once however often a run is catalogued.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from blipdiff.datasets.catalog import CatalogError, import_fiftyone
from blipdiff.tasks.evaluation.config import GENERATIONS, SCORES, SETTINGS_FILE

GENERATED, REFERENCE = "generated", "reference"
KIND = "dreambench evaluations"
SAVED_VIEWS = {
    "lowest-dino": "generated images, the lowest DINO first",
    "lowest-clip-t": "generated images, the lowest CLIP-T first",
    "per-subject": "generated images grouped by subject, the lowest DINO first",
    "by-run": "generated images grouped by run, to put runs side by side",
    "latest-run": "the images of the run catalogued last",
}
FIELDS = ("run", "run_folder", "model", "checkpoint_step", "mode", "subject", "class_name", "prompt", "prompt_index",
          "kind", "seed_set", "seed", "image_index", "dino", "clip_i", "clip_t", "created")


@dataclass
class EvalCatalogSummary:
    dataset: str
    run: str
    images: int
    references: int
    added: int
    removed: int
    saved_views: list[str] = field(default_factory=list)

    def app_command(self) -> str:
        return f"blipdiff app --dataset {self.dataset}"

    def as_dict(self) -> dict:
        return asdict(self)


def _rows(run: Path) -> list[dict]:
    import pandas as pd

    for name in (GENERATIONS, SCORES):
        if not (run / name).is_file():
            raise CatalogError(f"{run / name} is missing: catalogue a finished `blipdiff eval` run folder")
    generations = pd.read_parquet(run / GENERATIONS)
    scores = pd.read_parquet(run / SCORES, columns=["path", "dino", "clip_i", "clip_t"])
    merged = generations.merge(scores, on="path", how="inner")
    rows = []
    for row in merged.to_dict("records"):
        step = row.get("checkpoint_step")
        rows.append({"filepath": str(run / row["path"]), "run": row["run_id"], "run_folder": str(run),
                     "model": row["model"], "checkpoint_step": None if step is None or step != step else int(step),
                     "mode": row["mode"], "subject": row["subject"], "class_name": row["class"],
                     "prompt": row["prompt"], "prompt_index": int(row["prompt_index"]), "kind": row["kind"],
                     "seed_set": int(row["seed_set"]), "seed": int(row["seed"]), "image_index": int(row["image_index"]),
                     "dino": float(row["dino"]), "clip_i": float(row["clip_i"]), "clip_t": float(row["clip_t"]),
                     "created": row["created"]})
    return rows


def _open(fo, name: str):
    if fo.dataset_exists(name):
        dataset = fo.load_dataset(name)
        if dataset.info.get("kind") != KIND:
            raise CatalogError(f"dataset {name!r} is not a DreamBench catalog (it holds {dataset.info.get('kind') or 'pairs'}); "
                               "choose another --dataset")
        return dataset
    dataset = fo.Dataset(name)
    dataset.persistent = True
    dataset.info = {"kind": KIND}
    dataset.save()
    # Declared here: the models a run evaluates by hub id have no step, and a field first seen as None is not made.
    dataset.add_sample_field("checkpoint_step", fo.IntField)
    return dataset


def _same(present, rows: list[dict]) -> bool:
    if len(present) != len(rows):
        return False
    stored = dict(zip(present.values("filepath"), zip(*(present.values(name) for name in ("dino", "clip_i", "clip_t")))))
    return all(row["filepath"] in stored and stored[row["filepath"]] == (row["dino"], row["clip_i"], row["clip_t"])
               for row in rows)


def _save_views(dataset, latest_run_folder: str) -> list[str]:
    from fiftyone import ViewField as F

    generated = dataset.match_tags(GENERATED)
    views = {
        "lowest-dino": generated.sort_by("dino"),
        "lowest-clip-t": generated.sort_by("clip_t"),
        "per-subject": generated.group_by("subject", order_by="dino"),
        "by-run": generated.group_by("run", order_by="prompt_index"),
        "latest-run": generated.match(F("run_folder") == latest_run_folder),
    }
    for name, view in views.items():
        if dataset.has_saved_view(name):
            dataset.delete_saved_view(name)
        dataset.save_view(name, view, description=SAVED_VIEWS[name])
    return list(views)


def catalog_evaluation(run: Path, dataset_name: str) -> EvalCatalogSummary:
    """Mirror the run folder's generations and scores, and its subjects' real photos, into ``dataset_name``."""
    from fiftyone import ViewField as F

    from blipdiff.datasets.dreambench import read_dreambench

    run = run.resolve()
    rows = _rows(run)
    subjects = sorted({row["subject"] for row in rows})
    run_id = rows[0]["run"] if rows else run.name
    settings = json.loads((run / SETTINGS_FILE).read_text())
    bench = read_dreambench(Path(settings["dreambench"]))
    fo = import_fiftyone()
    dataset = _open(fo, dataset_name)

    added = removed = 0
    present = dataset.match(F("run_folder") == str(run)) if dataset.has_sample_field("run_folder") else None
    if present is None or not _same(present, rows):
        if present is not None and len(present):
            removed = len(present)
            dataset.delete_samples(present)
        samples = [fo.Sample(tags=[GENERATED], **row) for row in rows]
        dataset.add_samples(samples, progress=False)
        added = len(samples)
    catalogued = set(dataset.match_tags(REFERENCE).values("filepath")) if len(dataset) else set()
    references = [fo.Sample(filepath=str(photo.resolve()), tags=[REFERENCE], subject=subject.name,
                            class_name=subject.class_name)
                  for subject in map(bench.subject, subjects) for photo in subject.photos
                  if str(photo.resolve()) not in catalogued]
    if references:
        dataset.add_samples(references, progress=False)
    views = _save_views(dataset, str(run))
    return EvalCatalogSummary(dataset=dataset_name, run=run_id, images=len(rows),
                              references=len(catalogued) + len(references), added=added, removed=removed,
                              saved_views=views)
