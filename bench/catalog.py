"""Cataloguing speed: 10,000 pairs into FiftyOne in under 60 s.

    python bench/catalog.py [--pairs 10000] [--workdir /tmp/blipdiff-bench-catalog] [--no-record]

Builds the bundled demo sample for real (three pairs), then writes a build folder of N pairs (and 5%
as many rejected subjects) whose rows are those pairs under new image ids, each with its own image
files (hard links to the real ones), so the App can show every group. It then times, in a database of
its own that it drops at the end: cataloguing the folder into a new dataset, cataloguing it again
(nothing to add), cataloguing it once more after 10% more pairs were built, and the whole
`blipdiff catalog` command (Python, FiftyOne and the database starting included) into a new dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from benchmark_record import host, record

from blipdiff.datasets.catalog import SLICES, CatalogConfig, catalog_pairs, import_fiftyone

TARGET_SECONDS = 60.0


def demo_build(workdir: Path) -> Path:
    """The demo sample built for real: three pairs."""
    import ray

    from blipdiff.datasets.build import BuildConfig, build_pairs
    from blipdiff.datasets.openimages import FilterConfig, run_filter
    from blipdiff.datasets.samples import demo_annotations, write_demo_photos

    out = workdir / "demo"
    if (out / "pairs.parquet").is_file():
        return out
    photos, backgrounds = workdir / "photos", workdir / "backgrounds"
    photos.mkdir(parents=True, exist_ok=True)
    backgrounds.mkdir(parents=True, exist_ok=True)
    write_demo_photos(photos, backgrounds)
    boxes, classes = demo_annotations()
    run_filter(FilterConfig(boxes=boxes, classes=classes, out=workdir / "subjects"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        build_pairs(BuildConfig(subjects=workdir / "subjects" / "subjects.parquet", images=photos,
                                backgrounds=backgrounds, out=out))
    finally:
        ray.shutdown()
    return out


def scaled_folder(demo: Path, folder: Path, pairs: int) -> tuple[list[dict], list[dict]]:
    """``pairs`` pair rows and 5% as many reject rows, every pair with hard links to real image files."""
    from blipdiff.datasets.build import IMAGE_KINDS, SETTINGS, relative_path

    templates = pq.read_table(demo / "pairs.parquet").to_pylist()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(demo / SETTINGS, folder / SETTINGS)
    rows = []
    for index in range(pairs):
        template = templates[index % len(templates)]
        image_id = hashlib.sha1(f"pair-{index}".encode()).hexdigest()[:16]
        row = {**template, "image_id": image_id}
        for kind in IMAGE_KINDS:
            relative = relative_path(kind, image_id)
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            os.link(demo / template[f"{kind}_path"], folder / relative)
            row[f"{kind}_path"] = relative
        rows.append(row)
    rejects = [
        {"image_id": hashlib.sha1(f"reject-{index}".encode()).hexdigest()[:16], "label_mid": "/m/01yrx",
         "label_name": "Cat", "source_path": str(demo / templates[0]["target_path"]), "x_min": 0.1, "x_max": 0.9,
         "y_min": 0.1, "y_max": 0.9, "stage": "decode", "reason": "truncated image"}
        for index in range(pairs // 20)
    ]
    return rows, rejects


def write_manifests(folder: Path, pairs: list[dict], rejects: list[dict]) -> None:
    from blipdiff.datasets.build import PAIRS_SCHEMA, REJECTS_SCHEMA

    pq.write_table(pa.Table.from_pylist(pairs, schema=PAIRS_SCHEMA), folder / "pairs.parquet")
    pq.write_table(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), folder / "rejects.parquet")


def timed_catalog(folder: Path, dataset: str):

    started = time.perf_counter()
    summary = catalog_pairs(CatalogConfig(pairs=folder, dataset=dataset))
    return time.perf_counter() - started, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/blipdiff-bench-catalog"))
    parser.add_argument("--no-record", action="store_true", help="print the table only")
    args = parser.parse_args()
    # A database of the benchmark's own, dropped at the end: the user's datasets stay untouched.
    os.environ["FIFTYONE_DATABASE_NAME"] = f"blipdiff-bench-{uuid.uuid4().hex[:8]}"

    demo = demo_build(args.workdir)
    folder = args.workdir / f"pairs-{args.pairs}"
    pairs, rejects = scaled_folder(demo, folder, args.pairs + args.pairs // 10)
    first_pairs = pairs[: args.pairs]
    write_manifests(folder, first_pairs, rejects)

    started = time.perf_counter()
    fo = import_fiftyone()
    import fiftyone.core.odm as foo

    fo.list_datasets()  # starts FiftyOne's database: its start-up is not the catalog's time
    startup = time.perf_counter() - started
    try:
        new, summary = timed_catalog(folder, "bench")
        again, repeat = timed_catalog(folder, "bench")
        write_manifests(folder, pairs, rejects)
        grown, growth = timed_catalog(folder, "bench")
        samples = len(fo.load_dataset("bench").select_group_slices(_allow_mixed=True))
        write_manifests(folder, first_pairs, rejects)
        started = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "blipdiff"), "catalog", "--pairs", str(folder),
                        "--dataset", "bench-cli"], check=True, capture_output=True)
        command = time.perf_counter() - started
    finally:
        foo.get_db_client().drop_database(os.environ["FIFTYONE_DATABASE_NAME"])

    groups = args.pairs + len(rejects)
    samples_new = args.pairs * len(SLICES) + len(rejects)
    table = "\n".join([
        "| run | groups added | samples in the dataset | wall (s) | groups/s |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| new dataset: {args.pairs:,} pairs + {len(rejects):,} rejects | {summary.added:,} | "
        f"{samples_new:,} | {new:.1f} | {groups / new:,.0f} |",
        f"| the same folder again | {repeat.added:,} | {samples_new:,} | {again:.1f} | |",
        f"| after {len(pairs) - args.pairs:,} more pairs | {growth.added:,} | {samples:,} | {grown:.1f} | |",
        f"| `blipdiff catalog` into a new dataset, start-up included | {groups:,} | "
        f"{samples_new:,} | {command:.1f} | {groups / command:,.0f} |",
    ])
    print(f"FiftyOne's database started in {startup:.1f} s")
    print(table)
    met = new <= TARGET_SECONDS and repeat.added == 0 and growth.added == len(pairs) - args.pairs
    if not args.no_record:
        record(f"Catalog, {args.pairs:,} pairs into FiftyOne", f"{host()}, FiftyOne {fo.__version__}, MongoDB 6.0",
               [f"- target: a new dataset of {args.pairs:,} pairs in ≤ {TARGET_SECONDS:.0f} s; met: "
                f"{'yes' if met else 'no'}", f"- FiftyOne's database start-up, not counted: {startup:.1f} s"], table)
    if not met:
        print("TARGET MISSED", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
