"""Matting quality and speed on the alphamatting.com training set (27 photos with ground truth).

    python bench/matting.py [--data ../shared/data/alphamatting] [--no-record]

1. Trimap1: `blipdiff matte --trimaps` (its default settings) against pymatting's `estimate_alpha_cf`
   at full resolution, image by image, interleaved so both see the same machine: mean SAD over the
   unknown region (/1000) and wall time. Targets: SAD at most 1.05x, time at most 0.5x.
2. Boxes only: the box of ground-truth alpha > 0.5 per photo, `blipdiff matte --boxes` with the
   weight-free segmenter (GrabCut), mean full-image SAD (/1000). Target: at most 20. The box itself
   (alpha 1 inside, 0 outside) is listed for scale.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pymatting
from benchmark_record import ROOT, host, record
from PIL import Image

from blipdiff.datasets.matting import (
    MattingConfig,
    TrimapConfig,
    box_in_pixels,
    matte_folder,
    pull_matte,
)
from blipdiff.models.segmenters import GrabCutSegmenter

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alphamatting"


def load(path: Path, mode: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert(mode))


def trimap_part(data: Path, names: list[str], truths: dict[str, np.ndarray]) -> dict:
    config = MattingConfig(working_long_side=None)  # what `blipdiff matte` uses
    inputs = {n: load(data / "input_training_lowres" / f"{n}.png", "RGB") for n in names}
    trimaps = {n: load(data / "trimap_training_lowres" / "Trimap1" / f"{n}.png", "L") for n in names}
    # Both compile the same numba kernels: warm them before timing either.
    pymatting.estimate_alpha_cf(inputs[names[0]] / 255.0, trimaps[names[0]] / 255.0)
    pull_matte(inputs[names[0]], trimaps[names[0]], config, with_foreground=False)
    rows = []
    for n in names:
        unknown = (trimaps[n] > 0) & (trimaps[n] < 255)
        started = time.perf_counter()
        with warnings.catch_warnings():  # pymatting's solver warns on near-singular systems
            warnings.simplefilter("ignore", RuntimeWarning)
            reference = pymatting.estimate_alpha_cf(inputs[n] / 255.0, trimaps[n] / 255.0)
        reference_seconds = time.perf_counter() - started
        started = time.perf_counter()
        ours, _ = pull_matte(inputs[n], trimaps[n], config, with_foreground=False)
        ours_seconds = time.perf_counter() - started
        rows.append({
            "name": n,
            "reference_sad": np.abs(reference - truths[n])[unknown].sum() / 1000,
            "ours_sad": np.abs(ours - truths[n])[unknown].sum() / 1000,
            "reference_seconds": reference_seconds,
            "ours_seconds": ours_seconds,
        })
        print(f"{n}: SAD {rows[-1]['reference_sad']:.2f} -> {rows[-1]['ours_sad']:.2f}, "
              f"{reference_seconds:.2f} s -> {ours_seconds:.2f} s", flush=True)
    return {key: float(np.mean([r[key] for r in rows])) if "sad" in key else float(np.sum([r[key] for r in rows]))
            for key in rows[0] if key != "name"}


def box_part(data: Path, names: list[str], truths: dict[str, np.ndarray]) -> dict:
    boxes, box_sads = {}, {}
    for n in names:
        truth = truths[n]
        rows, cols = np.nonzero(truth > 0.5)
        height, width = truth.shape
        box = (cols.min() / width, (cols.max() + 1) / width, rows.min() / height, (rows.max() + 1) / height)
        boxes[f"{n}.png"] = box
        x0, y0, x1, y1 = box_in_pixels(box, width, height)
        as_box = np.zeros_like(truth)
        as_box[y0:y1, x0:x1] = 1.0
        box_sads[n] = np.abs(as_box - truth).sum() / 1000
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        report = matte_folder(data / "input_training_lowres", Path(out), boxes=boxes, segmenter=GrabCutSegmenter(),
                              trimap=TrimapConfig())
        seconds = time.perf_counter() - started
        sads = []
        for n in names:
            if f"{n}.png" in report.failed:
                alpha = np.zeros_like(truths[n])
                print(f"{n}: failed ({report.failed[f'{n}.png']}), counted as alpha 0", flush=True)
            else:
                alpha = load(Path(out) / f"{n}.png", "L").astype(np.float64) / 255.0
            sads.append(np.abs(alpha - truths[n]).sum() / 1000)
            print(f"{n}: full-image SAD {sads[-1]:.1f} (box {box_sads[n]:.1f})", flush=True)
    return {"box_sad": float(np.mean(list(box_sads.values()))), "ours_sad": float(np.mean(sads)), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/benchmarks.md")
    args = parser.parse_args()
    if not (args.data / "gt_training_lowres").is_dir():
        sys.exit(f"alphamatting data not found at {args.data}: pass --data")
    names = sorted(p.stem for p in (args.data / "gt_training_lowres").glob("GT*.png"))
    truths = {n: load(args.data / "gt_training_lowres" / f"{n}.png", "L").astype(np.float64) / 255.0 for n in names}

    trimap = trimap_part(args.data, names, truths)
    boxes = box_part(args.data, names, truths)
    sad_ratio = trimap["ours_sad"] / trimap["reference_sad"]
    time_ratio = trimap["ours_seconds"] / trimap["reference_seconds"]
    table = "\n".join([
        "| measurement | pymatting / box | blipdiff matte | ratio | target |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| Trimap1: mean SAD, unknown region | {trimap['reference_sad']:.3f} | {trimap['ours_sad']:.3f} | "
        f"{sad_ratio:.3f}x | ≤ 1.05x |",
        f"| Trimap1: wall time, {len(names)} photos (s) | {trimap['reference_seconds']:.1f} | {trimap['ours_seconds']:.1f} | "
        f"{time_ratio:.2f}x | ≤ 0.5x |",
        f"| boxes only (GrabCut): mean full-image SAD | {boxes['box_sad']:.1f} (the box) | {boxes['ours_sad']:.1f} | "
        f"| ≤ 20 |",
        f"| boxes only: wall time, {len(names)} photos (s) | | {boxes['seconds']:.1f} | | |",
    ])
    print(table)
    met = sad_ratio <= 1.05 and time_ratio <= 0.5 and boxes["ours_sad"] <= 20
    if not args.no_record:
        record(f"Matting, alphamatting.com training set ({len(names)} photos)", f"{host()}, pymatting {pymatting.__version__}",
               [f"- targets met: {'yes' if met else 'no'}"], table)
    if not met:
        print("TARGET MISSED", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
