"""Benchmark the subject filter (DuckDB) against the plain pandas way, side by side.

    python bench/filter.py --rows 6000000                      # sorted, grouped-but-unsorted and shuffled
    python bench/filter.py --rows 14600000 --orders shuffled   # the real train file's size

For each row order it generates an Open Images V6 train box file of the real file's shape: all 21 columns
filled in the real head's formats (`../shared/data/openimages/format_samples/`: six decimals for every
coordinate and click, `0`/`1` flags, `Confidence` 1, nearly every box `xclick` with its eight clicks, a few
`activemil` whose clicks are -1), about 153 bytes a row against the real file's 154.6; ~8 boxes per image,
Zipf-skewed class frequencies with the human and cluttered classes among the most frequent, as in the real
file. Orders: sorted by ImageID (the official files), grouped by image but not in ascending id order (as a
concatenation of files gives), or shuffled. It runs each implementation in its own process (wall time,
peak resident memory), checks that they choose the same subjects, prints a table (with the CSV scan's
floor and the seconds of each SQL statement) and appends it to docs/benchmarks.md. The pandas way is the
straightforward version a careful user writes, as the issue describes it: read the whole file, boolean
masks, groupby; the same script with `usecols` is timed beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from benchmark_record import ROOT, host, record

SHARED_CLASSES = ROOT.parent / "shared/data/openimages/class-descriptions-boxable.csv"
V6_COLUMNS = [
    "ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax", "IsOccluded",
    "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside", "XClick1X", "XClick2X", "XClick3X",
    "XClick4X", "XClick1Y", "XClick2Y", "XClick3Y", "XClick4Y",
]


ORDERS = ("sorted", "grouped", "shuffled")
MILLION = 1_000_000
ACTIVEMIL_SHARE = 0.02
# The real train file: 2,258,447,590 bytes (../shared/data/openimages/official_checksums) for 14,610,229 boxes.
REAL_BYTES_PER_ROW = 2_258_447_590 / 14_610_230


def generate_v6_boxes(path: Path, rows: int, classes: Path, seed: int = 0, order: str = "sorted") -> None:
    """Write a realistic V6-schema train box file of about ``rows`` rows in ``order`` (see ORDERS)."""
    from blipdiff.datasets.openimages import read_classes

    rng = np.random.default_rng(seed)
    mids = sorted(read_classes(classes))
    frequent = [m for m in ("/m/01g317", "/m/09j2d", "/m/04yx4", "/m/07j7r", "/m/0dzct", "/m/03bt1vf") if m in mids]
    others = [m for m in rng.permutation(mids) if m not in frequent]
    ranked = frequent + others
    weights = 1.0 / np.arange(1, len(ranked) + 1) ** 0.8
    weights /= weights.sum()
    ranked = np.array(ranked, dtype=object)

    boxes_per_image = np.maximum(1, rng.poisson(7.0, size=rows // 4 + 16))
    images = int(np.searchsorted(np.cumsum(boxes_per_image), rows)) + 1
    boxes_per_image = boxes_per_image[:images]
    image_keys = np.sort(rng.choice(np.iinfo(np.int64).max, size=images, replace=False).astype(np.uint64))
    image_of_box = np.repeat(np.arange(images), boxes_per_image)[:rows]
    # The orders draw from a generator of their own, so the three files hold the same rows.
    rows_order = np.arange(len(image_of_box))
    if order == "grouped":
        rank = np.random.default_rng(seed + 1).permutation(images)
        rows_order = np.argsort(rank[image_of_box], kind="stable")
    elif order == "shuffled":
        rows_order = np.random.default_rng(seed + 1).permutation(len(image_of_box))
    n = len(image_of_box)
    # An image's boxes draw mostly from a few classes of its own, so repeats within an image are common.
    image_theme = rng.choice(len(ranked), size=images, p=weights)
    same_as_theme = rng.random(n) < 0.2
    label_index = np.where(same_as_theme, image_theme[image_of_box], rng.choice(len(ranked), size=n, p=weights))

    # Most boxes are small, but about one in four frames its object closely (large boxes). Coordinates are whole
    # millionths, as the real file's six decimals are.
    large = rng.random(n) < 0.25
    width = np.clip(np.where(large, rng.beta(5.0, 2.0, size=n), rng.beta(1.1, 3.0, size=n)), 0.002, 1.0)
    height = np.clip(width * np.exp(rng.normal(0.0, 0.45, size=n)), 0.002, 1.0)
    w, h = np.round(width * MILLION).astype(np.int64), np.round(height * MILLION).astype(np.int64)
    x_min = np.floor(rng.random(n) * (MILLION - w)).astype(np.int64)
    y_min = np.floor(rng.random(n) * (MILLION - h)).astype(np.int64)
    x_max, y_max = np.minimum(x_min + np.maximum(w, 1), MILLION), np.minimum(y_min + np.maximum(h, 1), MILLION)
    # The real file's sources: nearly all boxes drawn by extreme clicking (their four clicks on the box's
    # edges filled), a few from other sources, whose clicks are -1.
    xclick = rng.random(n) >= ACTIVEMIL_SHARE

    def clicks(low, high):
        return pc.if_else(pa.array(xclick), _six_decimals(low + np.floor(rng.random(n) * (high - low + 1))), "-1")

    ids = np.array([f"{key:016x}" for key in image_keys.tolist()])[image_of_box]
    table = pa.table({
        "ImageID": ids,
        "Source": np.where(xclick, "xclick", "activemil"),
        "LabelName": ranked[label_index].astype(str),
        "Confidence": np.ones(n, dtype=np.int8),
        "XMin": _six_decimals(x_min), "XMax": _six_decimals(x_max),
        "YMin": _six_decimals(y_min), "YMax": _six_decimals(y_max),
        "IsOccluded": (rng.random(n) < 0.6).astype(np.int8),
        "IsTruncated": (rng.random(n) < 0.3).astype(np.int8),
        "IsGroupOf": (rng.random(n) < 0.06).astype(np.int8),
        "IsDepiction": (rng.random(n) < 0.05).astype(np.int8),
        "IsInside": (rng.random(n) < 0.01).astype(np.int8),
        "XClick1X": clicks(x_min, x_max), "XClick2X": clicks(x_min, x_max),
        "XClick3X": clicks(x_min, x_max), "XClick4X": clicks(x_min, x_max),
        "XClick1Y": clicks(y_min, y_max), "XClick2Y": clicks(y_min, y_max),
        "XClick3Y": clicks(y_min, y_max), "XClick4Y": clicks(y_min, y_max),
    })
    with open(path, "wb") as handle:  # the header unquoted, as the real file's
        handle.write((",".join(V6_COLUMNS) + "\n").encode())
        pa_csv.write_csv(table.take(rows_order), handle,
                         pa_csv.WriteOptions(include_header=False, quoting_style="none", batch_size=1 << 16))


def _six_decimals(millionths: np.ndarray) -> pa.Array:
    """Whole millionths in [0, 10**6] as the real file writes them: ``0.012500``, ``1.000000``."""
    millionths = np.asarray(millionths, dtype=np.int64)
    text = np.empty((len(millionths), 8), dtype=np.uint8)
    text[:, 0] = ord("0") + millionths // MILLION
    text[:, 1] = ord(".")
    rest = millionths % MILLION
    for place in range(7, 1, -1):
        text[:, place] = ord("0") + rest % 10
        rest //= 10
    return pa.array(text.view("S8").ravel()).cast(pa.string())


def pandas_baseline(boxes: Path, classes: Path, usecols: bool = False) -> pd.DataFrame:
    """The plain pandas way: read the whole file (ids as text), boolean masks, groupby. With ``usecols`` it parses
    only the eight columns the rules read (what a careful user adds once the file is large)."""
    from blipdiff.datasets.openimages import BOX_COLUMNS, FilterRules
    from blipdiff.datasets.subjects import SUBJECT_COLUMNS

    rules = FilterRules.paper_defaults()
    df = pd.read_csv(boxes, dtype={"ImageID": str, "LabelName": str}, usecols=list(BOX_COLUMNS) if usecols else None)
    names = pd.read_csv(classes, header=None, names=["mid", "name"]).set_index("mid")["name"]
    coords = df[["XMin", "XMax", "YMin", "YMax"]]
    valid = (
        df[["ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf", "IsInside"]].notna().all(axis=1)
        & df["LabelName"].isin(names.index)
        & ((coords >= 0) & (coords <= 1)).all(axis=1)
        & (df["XMax"] > df["XMin"])
        & (df["YMax"] > df["YMin"])
    )
    df = df[valid]
    same_class = df.groupby(["ImageID", "LabelName"])["LabelName"].transform("size")
    width, height = df["XMax"] - df["XMin"], df["YMax"] - df["YMin"]
    area = width * height
    aspect = np.maximum(width / height, height / width)
    human_images = df.loc[df["LabelName"].isin(list(rules.human_classes)), "ImageID"].unique()
    keep = (
        (df["IsGroupOf"] != 1) & (same_class == 1) & (df["IsInside"] != 1)
        & (aspect <= rules.max_aspect) & (area >= rules.min_area) & (area <= rules.max_area)
        & ~df["ImageID"].isin(human_images) & ~df["LabelName"].isin(list(rules.cluttered_classes))
    )
    chosen = (
        df[keep].assign(area=area[keep], aspect=aspect[keep])
        .sort_values(["ImageID", "area", "LabelName"], ascending=[True, False, True])
        .drop_duplicates("ImageID")
    )
    out = pd.DataFrame({
        "image_id": chosen["ImageID"].astype(str), "label_mid": chosen["LabelName"].astype(str),
        "label_name": chosen["LabelName"].map(names).astype(str),
        "x_min": chosen["XMin"], "x_max": chosen["XMax"], "y_min": chosen["YMin"], "y_max": chosen["YMax"],
        "area": chosen["area"], "aspect": chosen["aspect"],
    })
    return out[list(SUBJECT_COLUMNS)].reset_index(drop=True)


def _worker(kind: str, boxes: Path, classes: Path, out: Path) -> None:
    started = time.perf_counter()
    statements = {}
    if kind == "duckdb":
        from blipdiff.datasets.openimages import FilterConfig, run_filter

        statements = run_filter(FilterConfig(boxes=boxes, classes=classes, out=out)).seconds
    elif kind == "scan":
        statements = {"scan": scan_floor(boxes)}
    else:
        from blipdiff.datasets.subjects import write_subjects

        out.mkdir(parents=True, exist_ok=True)
        write_subjects(pandas_baseline(boxes, classes, usecols=kind == "pandas-usecols"), out / "subjects.parquet")
    seconds = time.perf_counter() - started
    peak_mib = _peak_resident_mib()
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib, "statements": statements}))


def scan_floor(boxes: Path) -> float:
    """Seconds for DuckDB to count the file's rows through the filter's own reader (the same ``read_csv`` options,
    memory limit and threads): what any query of the file costs, the floor under the filter."""
    import duckdb

    from blipdiff.datasets.openimages import DEFAULT_BLOCK_BYTES, DEFAULT_MEMORY_LIMIT, _source

    source = _source(boxes, DEFAULT_BLOCK_BYTES)["source"]
    with tempfile.TemporaryDirectory() as temp, duckdb.connect() as connection:
        connection.execute(f"SET memory_limit = '{DEFAULT_MEMORY_LIMIT}'; SET temp_directory = '{temp}'")
        started = time.perf_counter()
        connection.execute(f"SELECT count(*) FROM {source}").fetchone()
        return time.perf_counter() - started


def _peak_resident_mib() -> float:
    """This process's peak resident memory. Not ru_maxrss: Linux carries that over fork and exec,
    so a worker started by a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM is not in /proc/self/status: peak memory needs Linux")


def _measure(kind: str, boxes: Path, classes: Path, out: Path) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--boxes", str(boxes), "--classes", str(classes),
               "--out", str(out)]
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime  # every thread of the worker
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=6_000_000)
    parser.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=Path, default=SHARED_CLASSES)
    parser.add_argument("--workdir", type=Path, help="keep the generated files and outputs here")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument("--worker", choices=["duckdb", "pandas", "pandas-usecols", "scan"], help=argparse.SUPPRESS)
    parser.add_argument("--boxes", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.boxes, args.classes, args.out)
        return
    if not args.classes.is_file():
        sys.exit(f"class descriptions not found at {args.classes}: pass --classes")

    from blipdiff.datasets.openimages import DEFAULT_MEMORY_LIMIT
    from blipdiff.datasets.subjects import read_subjects

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="blipdiff-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    lines = ["| rows | order | file (GiB) | bytes/row | DuckDB wall (s) | pandas wall (s) | time ratio (≤ 0.5x) "
             "| CSV scan floor (s) | floor ratio | pandas, usecols (s) | ratio to it | DuckDB peak RSS (MiB) "
             "| pandas peak RSS (MiB) | memory ratio (≤ 0.25x) | CPU s: DuckDB / pandas / scan | same subjects |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| --- |"]
    breakdown = []
    missed = False
    for order in args.orders:
        boxes = workdir / f"v6-boxes-{args.rows}-{order}.csv"
        if not boxes.exists():
            started = time.perf_counter()
            generate_v6_boxes(boxes, args.rows, args.classes, args.seed, order)
            print(f"generated {boxes} ({boxes.stat().st_size / 2**30:.2f} GiB, "
                  f"{boxes.stat().st_size / args.rows:.1f} bytes a row; the real file "
                  f"{REAL_BYTES_PER_ROW:.1f}) in {time.perf_counter() - started:.0f} s", flush=True)
        results = {}
        for kind in ("duckdb", "pandas", "pandas-usecols", "scan"):
            results[kind] = _measure(kind, boxes, args.classes, workdir / f"{order}-{kind}")
            print(f"{order}, {kind}: {results[kind]['wall']:.1f} s ({results[kind]['cpu']:.1f} s CPU), "
                  f"{results[kind]['peak_mib']:.0f} MiB", flush=True)
        ours = read_subjects(workdir / f"{order}-duckdb" / "subjects.parquet")
        for kind in ("pandas", "pandas-usecols"):
            theirs = read_subjects(workdir / f"{order}-{kind}" / "subjects.parquet")
            pd.testing.assert_frame_equal(ours, theirs, check_exact=False, rtol=0, atol=1e-9)
        wall = results["duckdb"]["wall"] / results["pandas"]["wall"]
        floor = results["scan"]["wall"] / results["pandas"]["wall"]
        against_usecols = results["duckdb"]["wall"] / results["pandas-usecols"]["wall"]
        memory = results["duckdb"]["peak_mib"] / results["pandas"]["peak_mib"]
        missed |= wall > 0.5 or memory > 0.25
        size = boxes.stat().st_size
        lines.append(f"| {args.rows:,} | {order} | {size / 2**30:.2f} | {size / args.rows:.0f} | "
                     f"{results['duckdb']['wall']:.1f} | {results['pandas']['wall']:.1f} | {wall:.2f}x | "
                     f"{results['scan']['wall']:.1f} | {floor:.2f}x | {results['pandas-usecols']['wall']:.1f} | "
                     f"{against_usecols:.2f}x | {results['duckdb']['peak_mib']:.0f} | "
                     f"{results['pandas']['peak_mib']:.0f} | {memory:.2f}x | {results['duckdb']['cpu']:.1f} / "
                     f"{results['pandas']['cpu']:.1f} / {results['scan']['cpu']:.1f} | yes ({len(ours):,}) |")
        statements = results["duckdb"]["statements"]
        breakdown.append(f"| {order} | " + " | ".join(f"{value:.2f}" for value in statements.values())
                         + f" | {results['scan']['statements']['scan']:.2f} |")
    header = " | ".join(statements)
    lines += ["", f"Seconds of each statement of `datasets/rules/subject_filter.sql` inside the DuckDB run, beside "
              "the bare scan (`SELECT count(*)` through the same reader):", "",
              f"| order | {header} | bare scan |", "| --- |" + " ---: |" * (len(statements) + 1), *breakdown]
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        record(f"Subject filter (DuckDB) against the plain pandas way, {args.rows:,} rows",
               f"{host()}, Python {platform.python_version()}",
               [f"- DuckDB with its default memory limit here ({DEFAULT_MEMORY_LIMIT}), all cores; each side in its own "
                "process, wall time including the process start and peak resident memory (VmHWM)",
                "- pandas: `read_csv` of the whole file (ids as text), boolean masks, groupby; the ratios' baseline. "
                "Beside it the same script with `usecols` (the eight columns the rules read)",
                "- CSV scan floor: `SELECT count(*)` through the filter's own `read_csv` (same options, memory limit, "
                "threads), in its own process like the others"], table)
    if missed:
        print("TARGET MISSED", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
