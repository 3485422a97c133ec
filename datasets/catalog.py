"""The catalog: every pair of a build folder in a FiftyOne dataset, to judge the data before training.

One group per subject. A pair's group has the slices ``target`` (the original image, with the subject's
box as a labelled detection and the matte and trimap as overlays), ``input`` (the synthetic model
input), ``composite``, ``alpha`` (the matte, as an image and as a heat map) and ``trimap`` (a
segmentation whose classes are named). A rejected subject's group has only its ``target``, tagged
``rejected``, with the stage and the reason. Every sample carries the pair's fields (label, captions,
foreground and unknown fractions, seconds per stage), so sorting and filtering work on any slice.

The database records paths, never pixels. Cataloguing mirrors the manifests: groups that are complete
and still in the manifests stay, new subjects are added, and anything else (a group cut short by a
crash, a reject that became a pair) is replaced, so a rerun leaves exactly one group per subject.
A dataset belongs to one build folder: the outputs of two builds never mix in it.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from blipdiff.datasets.configs import CatalogConfig
from blipdiff.datasets.build import IMAGE_KINDS, SETTINGS, STAGES
from blipdiff.datasets.matting import (
    TRIMAP_BACKGROUND,
    TRIMAP_FOREGROUND,
    TRIMAP_UNKNOWN,
)

SLICES = tuple(IMAGE_KINDS)  # target, composite, input, alpha, trimap
TRIMAP_CLASSES = {TRIMAP_BACKGROUND: "background", TRIMAP_UNKNOWN: "unknown", TRIMAP_FOREGROUND: "foreground"}
PAIR, REJECTED = "pair", "rejected"
SAVED_VIEWS = {
    "largest-unknown-band": "pairs, the widest unknown band of the trimap first",
    "smallest-foreground": "pairs, the smallest matted foreground first",
    "by-class": "pairs grouped by class label",
    "rejected": "rejected subjects, with their stage and reason",
}


class CatalogError(RuntimeError):
    """The catalog cannot be written as asked; the message says why and what to do."""


@dataclass
class CatalogSummary:
    dataset: str
    pairs: int
    rejects: int
    added: int
    removed: int
    saved_views: list[str] = field(default_factory=list)

    def app_command(self) -> str:
        return f"blipdiff app --dataset {self.dataset}"


def import_fiftyone():
    """FiftyOne, with its usage tracking off unless asked for."""
    # Offline by default, as with Prefect's telemetry; FIFTYONE_DO_NOT_TRACK=false turns it back on.
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    import fiftyone

    return fiftyone


def _read_manifests(folder: Path) -> tuple[list[dict], list[dict]]:
    pairs_path = folder / "pairs.parquet"
    if not pairs_path.is_file():
        raise CatalogError(f"{pairs_path} is missing: --pairs takes a build folder (blipdiff build --out)")
    pairs = pq.read_table(pairs_path).to_pylist()
    rejects_path = folder / "rejects.parquet"
    rejects = pq.read_table(rejects_path).to_pylist() if rejects_path.is_file() else []
    if rejects and "source_path" not in rejects[0]:
        raise CatalogError(f"{rejects_path} predates the catalog: run `blipdiff build` on the folder again")
    return pairs, rejects


def _box(x_min: float, x_max: float, y_min: float, y_max: float) -> list[float]:
    return [x_min, y_min, x_max - x_min, y_max - y_min]


def _pair_group(fo, folder: Path, row: dict) -> list:
    width, height = row["width"], row["height"]
    fields = {
        "image_id": row["image_id"], "status": PAIR, "label": row["label_name"], "label_mid": row["label_mid"],
        "caption": row["caption"], "captions": list(row["captions"]), "width": width, "height": height,
        "background": row["background"], "foreground_fraction": row["foreground_fraction"],
        "unknown_fraction": row["unknown_fraction"],
        **{f"{stage}_seconds": row[f"{stage}_seconds"] for stage in STAGES},
        "total_seconds": sum(row[f"{stage}_seconds"] for stage in STAGES),
    }
    paths = {kind: str(folder / row[f"{kind}_path"]) for kind in SLICES}
    subject = fo.Detections(detections=[fo.Detection(
        label=row["label_name"],
        bounding_box=_box(row["box_x0"] / width, row["box_x1"] / width, row["box_y0"] / height, row["box_y1"] / height),
    )])
    matte = {"matte": fo.Heatmap(map_path=paths["alpha"], range=[0, 255])}
    trimap = {"trimap": fo.Segmentation(mask_path=paths["trimap"])}
    labels = {"target": {"subject": subject, **matte, **trimap}, "alpha": matte, "trimap": trimap}
    group = fo.Group()
    return [
        fo.Sample(filepath=paths[kind], group=group.element(kind), **fields, **labels.get(kind, {}))
        for kind in SLICES
    ]


def _reject_group(fo, row: dict) -> list:
    subject = fo.Detections(detections=[fo.Detection(
        label=row["label_name"], bounding_box=_box(row["x_min"], row["x_max"], row["y_min"], row["y_max"]),
    )])
    return [fo.Sample(
        filepath=row["source_path"], group=fo.Group().element("target"), tags=[REJECTED],
        image_id=row["image_id"], status=REJECTED, label=row["label_name"], label_mid=row["label_mid"],
        reject_stage=row["stage"], reject_reason=row["reason"], subject=subject,
    )]


def _open_dataset(fo, config: CatalogConfig, folder: Path):
    if config.replace and fo.dataset_exists(config.dataset):
        fo.delete_dataset(config.dataset)
    if fo.dataset_exists(config.dataset):
        dataset = fo.load_dataset(config.dataset)
        owner = dataset.info.get("pairs_folder")
        if owner != str(folder):
            raise CatalogError(
                f"dataset {config.dataset!r} catalogues {owner or 'something else'}, not {folder}: "
                "choose another --dataset, or --replace it"
            )
        return dataset
    dataset = fo.Dataset(config.dataset)
    dataset.persistent = True
    dataset.add_group_field("group", default="target")
    dataset.mask_targets = {"trimap": dict(TRIMAP_CLASSES)}
    settings = folder / SETTINGS
    dataset.info = {
        "pairs_folder": str(folder),
        "build_settings": json.loads(settings.read_text()) if settings.is_file() else None,
    }
    dataset.save()
    return dataset


def _catalogued(dataset) -> dict[str, dict[str, tuple[str, int]]]:
    """image_id -> {group id: (status, samples in the group)}, for every group in the dataset."""
    found: dict[str, dict[str, tuple[str, int]]] = defaultdict(dict)
    if not dataset.has_sample_field("image_id"):
        return found
    every_slice = dataset.select_group_slices(_allow_mixed=True)
    for image_id, status, group_id in zip(*every_slice.values(["image_id", "status", "group.id"]), strict=True):
        _, count = found[image_id].get(group_id, (status, 0))
        found[image_id][group_id] = (status, count + 1)
    return found


def _save_views(fo, dataset) -> list[str]:
    from fiftyone import ViewField as F

    pairs = dataset.match(F("status") == PAIR)
    views = {
        "largest-unknown-band": pairs.sort_by("unknown_fraction", reverse=True),
        "smallest-foreground": pairs.sort_by("foreground_fraction"),
        "by-class": pairs.group_by("label", order_by="foreground_fraction"),
        "rejected": dataset.match_tags(REJECTED),
    }
    for name, view in views.items():
        if dataset.has_saved_view(name):
            dataset.delete_saved_view(name)
        dataset.save_view(name, view, description=SAVED_VIEWS[name])
    return list(views)


def catalog_pairs(config: CatalogConfig) -> CatalogSummary:
    """Mirror a build folder's pairs and rejects into the FiftyOne dataset ``config.dataset``."""
    folder = config.pairs.resolve()
    if folder.is_file():
        folder = folder.parent
    pairs, rejects = _read_manifests(folder)
    fo = import_fiftyone()
    dataset = _open_dataset(fo, config, folder)

    wanted = {row["image_id"]: (REJECTED, 1) for row in rejects} | {row["image_id"]: (PAIR, len(SLICES)) for row in pairs}
    present = _catalogued(dataset)
    # A subject stays when it has exactly one group, complete and of the status the manifests give it.
    keep = {image_id for image_id, groups in present.items()
            if len(groups) == 1 and next(iter(groups.values())) == wanted.get(image_id)}
    stale = [group for image_id, groups in present.items() if image_id not in keep for group in groups]
    if stale:
        dataset.delete_groups(stale)
    new_pairs = [_pair_group(fo, folder, row) for row in pairs if row["image_id"] not in keep]
    new_rejects = [_reject_group(fo, row) for row in rejects if row["image_id"] not in keep]
    # Every group of a kind has the same fields: the first of each declares them, and the rest skip
    # FiftyOne's per-sample schema expansion, which is most of the cost of adding a group.
    for groups in (new_pairs, new_rejects):
        if groups:
            dataset.add_samples(groups[0], progress=False)
    rest = [sample for groups in (new_pairs, new_rejects) for group in groups[1:] for sample in group]
    if rest:
        dataset.add_samples(rest, expand_schema=False, progress=False)
    added = len(wanted) - len(keep)
    views = _save_views(fo, dataset)
    return CatalogSummary(dataset=config.dataset, pairs=len(pairs), rejects=len(rejects), added=added,
                          removed=len(stale), saved_views=views)
