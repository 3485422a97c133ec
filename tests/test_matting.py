"""Trimaps and closed-form matting, and `blipdiff matte` on alphamatting.com photos with ground truth."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pymatting
import pytest
from helpers import shared_path
from PIL import Image

from blipdiff.datasets.matting import (
    COARSE_START_MIN_UNKNOWN,
    MattingConfig,
    MattingError,
    TrimapConfig,
    box_in_pixels,
    estimate_alpha,
    make_trimap,
    pull_matte,
)

BLIPDIFF = Path(sys.executable).parent / "blipdiff"
PHOTOS = ["GT01", "GT02", "GT05"]
# pymatting's own mean SAD over the unknown region for these photos (the baseline CSV in ../shared).
PYMATTING_SAD = {"GT01": 1.13, "GT02": 4.31, "GT05": 1.26}


def load(path: Path, mode: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert(mode))


@pytest.fixture(scope="module")
def alphamatting(tmp_path_factory) -> dict:
    root = shared_path("alphamatting")
    folder = tmp_path_factory.mktemp("alphamatting")
    for kind, source in (("images", "input_training_lowres"), ("trimaps", "trimap_training_lowres/Trimap1"),
                         ("truth", "gt_training_lowres")):
        (folder / kind).mkdir()
        for name in PHOTOS:
            shutil.copy(root / source / f"{name}.png", folder / kind / f"{name}.png")
    return {kind: folder / kind for kind in ("images", "trimaps", "truth")}


def truth(alphamatting: dict, name: str) -> np.ndarray:
    return load(alphamatting["truth"] / f"{name}.png", "L").astype(np.float64) / 255


def ground_truth_box(alpha: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.nonzero(alpha > 0.5)
    height, width = alpha.shape
    return cols.min() / width, (cols.max() + 1) / width, rows.min() / height, (rows.max() + 1) / height


# The crop has too few unknown pixels for a half-resolution first guess; the whole photo has enough.
@pytest.mark.parametrize(("window", "coarse_start"), [((slice(100, 300), slice(200, 500)), False),
                                                      ((slice(None), slice(None)), True)],
                         ids=["crop-from-zero", "photo-from-half-resolution-guess"])
def test_solving_only_the_unknown_crop_is_exact(alphamatting, window, coarse_start):
    image = load(alphamatting["images"] / "GT01.png", "RGB")[window] / 255.0
    trimap = load(alphamatting["trimaps"] / "GT01.png", "L")[window] / 255.0
    if coarse_start:
        assert ((trimap > 0) & (trimap < 1)).sum() >= COARSE_START_MIN_UNKNOWN
    reference = pymatting.estimate_alpha_cf(image, trimap)
    strict = MattingConfig(working_long_side=None, discard_threshold=1e-4, rtol=1e-9, coarse_start=coarse_start)
    ours = estimate_alpha(image, trimap, strict)
    known = (trimap == 0) | (trimap == 1)
    assert np.array_equal(ours[known], trimap[known])
    assert np.abs(ours - reference).max() < 1e-3


def test_trimap_from_a_probability_map():
    probabilities = np.zeros((100, 120), dtype=np.float32)
    probabilities[20:80, 30:90] = 1.0
    probabilities[20:80, 25:30] = 0.3  # uncertain, but possible
    trimap = make_trimap(probabilities, (25, 20, 90, 80), TrimapConfig(band=0.05))
    assert set(np.unique(trimap)) == {0, 128, 255}
    assert trimap[50, 60] == 255 and trimap[5, 5] == 0 and trimap[50, 27] == 128
    assert trimap[50, 30] == 128, "the foreground is eroded by the band"
    with pytest.raises(MattingError, match="no foreground"):
        make_trimap(np.full((50, 50), 0.4, np.float32), (0, 0, 50, 50), TrimapConfig())
    with pytest.raises(MattingError, match="outside the box"):
        make_trimap(probabilities, (0, 0, 20, 20), TrimapConfig())


def test_matte_at_a_working_resolution_comes_back_at_full_size(alphamatting):
    image = load(alphamatting["images"] / "GT02.png", "RGB")
    trimap = load(alphamatting["trimaps"] / "GT02.png", "L")
    trimap = np.where(trimap < 1, 0, np.where(trimap > 254, 255, 128)).astype(np.uint8)
    alpha, foreground = pull_matte(image, trimap, MattingConfig(working_long_side=256))
    assert alpha.shape == trimap.shape and foreground.shape == image.shape
    assert np.all(alpha[trimap == 255] == 1) and np.all(alpha[trimap == 0] == 0)
    unknown = trimap == 128
    sad = np.abs(alpha - truth(alphamatting, "GT02"))[unknown].sum() / 1000
    assert sad < 2 * PYMATTING_SAD["GT02"]
    inside = alpha > 0.99
    assert np.abs(foreground[inside] * 255 - image[inside]).mean() < 3


def test_matte_command_with_trimaps_matches_pymatting_quality(alphamatting, tmp_path):
    out = tmp_path / "alphas"
    done = subprocess.run([str(BLIPDIFF), "matte", "--images", str(alphamatting["images"]),
                           "--trimaps", str(alphamatting["trimaps"]), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"{n}.png" for n in PHOTOS]
    for name in PHOTOS:
        alpha = Image.open(out / f"{name}.png")
        assert alpha.mode == "L"
        trimap = load(alphamatting["trimaps"] / f"{name}.png", "L")
        unknown = (trimap > 0) & (trimap < 255)
        sad = np.abs(np.asarray(alpha) / 255 - truth(alphamatting, name))[unknown].sum() / 1000
        assert sad <= 1.1 * PYMATTING_SAD[name], name


def test_matte_command_from_boxes_beats_the_box(alphamatting, tmp_path):
    boxes = tmp_path / "boxes.csv"
    with open(boxes, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "x_min", "x_max", "y_min", "y_max"])
        for name in PHOTOS[:2]:
            writer.writerow([f"{name}.png", *ground_truth_box(truth(alphamatting, name))])
    out = tmp_path / "alphas"
    done = subprocess.run([str(BLIPDIFF), "matte", "--images", str(alphamatting["images"]), "--boxes", str(boxes),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, "GT05 has no box and must be reported"
    assert "failed: GT05.png: no box for this image in the box CSV" in done.stderr
    for name in PHOTOS[:2]:
        expected = truth(alphamatting, name)
        x0, y0, x1, y1 = box_in_pixels(ground_truth_box(expected), expected.shape[1], expected.shape[0])
        as_box = np.zeros_like(expected)
        as_box[y0:y1, x0:x1] = 1
        ours = load(out / f"{name}.png", "L") / 255
        assert np.abs(ours - expected).sum() < 0.3 * np.abs(as_box - expected).sum(), name


@pytest.mark.parametrize(
    ("arguments", "message"),
    [([], "exactly one of --trimaps and --boxes"), (["--trimaps", "t", "--boxes", "b.csv"], "exactly one")],
)
def test_matte_command_needs_one_source(tmp_path, arguments, message):
    done = subprocess.run([str(BLIPDIFF), "matte", "--images", str(tmp_path), "--out", str(tmp_path / "o"),
                           *arguments], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr


def test_a_bad_box_csv_is_a_clear_error(alphamatting, tmp_path):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("GT01.png,0.5,0.2,0.1,0.9\n")
    done = subprocess.run([str(BLIPDIFF), "matte", "--images", str(alphamatting["images"]), "--boxes", str(boxes),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not inside [0, 1] with min < max" in done.stderr


def test_matte_command_with_clipseg_prompts_with_the_label_column(alphamatting, tmp_path):
    pytest.importorskip("torch")
    from tiny_models import save_tiny_clipseg

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(alphamatting["images"] / "GT01.png", images / "GT01.png")
    box = ground_truth_box(truth(alphamatting, "GT01"))
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("GT01.png," + ",".join(map(str, box)) + "\n")
    command = [str(BLIPDIFF), "matte", "--images", str(images), "--segmenter", "clipseg",
               "--segment-model", str(save_tiny_clipseg(tmp_path / "clipseg")), "--out", str(tmp_path / "o")]
    done = subprocess.run([*command, "--boxes", str(unlabelled)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "give every row of --boxes a label column" in done.stderr

    labelled = tmp_path / "labelled.csv"
    labelled.write_text("name,x_min,x_max,y_min,y_max,label\nGT01.png," + ",".join(map(str, box)) + ",toy\n")
    done = subprocess.run([*command, "--boxes", str(labelled)], capture_output=True, text=True, timeout=300)
    # A random CLIPSeg sees no subject, so the image gets the matting verdict on its map, not a crash.
    assert done.returncode == 1 and "failed: GT01.png: trimap has no foreground" in done.stderr, done.stderr[-3000:]
