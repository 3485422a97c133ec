"""Subject extraction end to end on Ray: real photos, broken inputs, seeds, reruns and crashes."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import shared_path
from PIL import Image

from blipdiff.datasets.build import IMAGE_KINDS, PAIRS_SCHEMA, BuildConfig, build_pairs

SUBJECTS = ["dog", "cat", "teapot", "backpack", "vase"]
# The DreamBench subjects sit in the middle of their photos: these boxes frame them.
BOXES = {"dog": (0.1, 0.9, 0.05, 0.95), "cat": (0.0, 0.95, 0.3, 0.98), "teapot": (0.15, 0.85, 0.1, 0.75),
         "backpack": (0.2, 0.75, 0.15, 0.9), "vase": (0.05, 0.6, 0.05, 0.95)}


def image_id(name: str) -> str:
    return hashlib.md5(name.encode()).hexdigest()[:16]


def subject_row(name: str, box=(0.1, 0.9, 0.1, 0.9), label="Thing") -> dict:
    x_min, x_max, y_min, y_max = box
    return {"image_id": image_id(name), "label_mid": "/m/0test", "label_name": label, "x_min": x_min,
            "x_max": x_max, "y_min": y_min, "y_max": y_max, "area": (x_max - x_min) * (y_max - y_min),
            "aspect": 1.0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """Subjects over real DreamBench photos (shrunk), plus one broken or unusual file of every kind."""
    root = shared_path("dreambench", "dataset")
    folder = tmp_path_factory.mktemp("build-inputs")
    images = folder / "images"
    images.mkdir()
    rows = []
    for name in SUBJECTS:
        with Image.open(root / name / "00.jpg") as photo:
            photo = photo.convert("RGB")
            photo.thumbnail((320, 320))
            photo.save(images / f"{image_id(name)}.jpg", quality=92)
        rows.append(subject_row(name, BOXES[name], name.capitalize()))

    with Image.open(root / "dog" / "00.jpg") as photo:
        photo = photo.convert("RGB")
        photo.thumbnail((240, 240))
        dog = photo.copy()
    encoded = io.BytesIO()
    dog.save(encoded, format="JPEG")
    special = {
        "truncated": encoded.getvalue()[: len(encoded.getvalue()) // 3],
        "zero-byte": b"",
        "not-an-image": b"%PDF-1.4 this is not a picture\n" * 20,
    }
    for name, data in special.items():
        (images / f"{image_id(name)}.jpg").write_bytes(data)
        rows.append(subject_row(name))
    dog.convert("CMYK").save(images / f"{image_id('cmyk')}.jpg", format="JPEG")
    grey16 = (np.asarray(dog.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(images / f"{image_id('sixteen-bit')}.jpg", format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated by 90 degrees
    dog.resize((240, 160)).save(images / f"{image_id('exif-rotated')}.jpg", exif=exif)
    Image.new("RGB", (2400, 2200), "grey").save(images / f"{image_id('huge')}.jpg", quality=50)
    for name in ("cmyk", "sixteen-bit", "exif-rotated", "huge", "missing"):
        rows.append(subject_row(name, (0.2, 0.8, 0.15, 0.85)))
    # Wide in normalised units, and wider still in pixels once decoded.
    rows.append(subject_row("too-wide", (0.0, 1.0, 0.3, 0.8)))
    dog.resize((300, 150)).save(images / f"{image_id('too-wide')}.jpg")

    subjects = folder / "subjects.parquet"
    pq.write_table(pa.Table.from_pylist(rows), subjects)
    return {"subjects": subjects, "images": images,
            "backgrounds": shared_path("backgrounds", "kodak")}


def config_for(dataset: dict, out: Path, **options) -> BuildConfig:
    return BuildConfig(subjects=dataset["subjects"], images=dataset["images"], backgrounds=dataset["backgrounds"],
                       out=out, max_pixels=4_000_000, **options)


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in rows]


def read(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / name).to_pylist()


@pytest.fixture(scope="module")
def built(ray_cluster, dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "out"
    build_pairs(config_for(dataset, out))
    return out


def test_every_subject_becomes_a_pair_or_a_reject_with_its_reason(built):
    pairs = {p["image_id"]: p for p in read(built, "pairs.parquet")}
    rejects = {r["image_id"]: (r["stage"], r["reason"]) for r in read(built, "rejects.parquet")}
    expected_pairs = SUBJECTS + ["cmyk", "sixteen-bit", "exif-rotated"]
    assert set(pairs) == {image_id(n) for n in expected_pairs}
    assert rejects[image_id("truncated")][0] == "decode" and "truncated" in rejects[image_id("truncated")][1]
    assert rejects[image_id("zero-byte")] == ("decode", "empty file")
    assert rejects[image_id("not-an-image")] == ("decode", "not an image Pillow can identify")
    assert rejects[image_id("missing")] == ("decode", "missing file")
    assert rejects[image_id("huge")] == ("decode", "2400x2200 exceeds the 4000000-pixel limit")
    assert rejects[image_id("too-wide")][0] == "decode" and "in pixels exceeds 2" in rejects[image_id("too-wide")][1]
    assert len(pairs) + len(rejects) == 14
    assert pq.read_schema(built / "pairs.parquet").equals(PAIRS_SCHEMA)


def test_pairs_hold_real_images_captions_and_statistics(built):
    for pair in read(built, "pairs.parquet"):
        target = np.asarray(Image.open(built / pair["target_path"]))
        assert target.shape == (pair["height"], pair["width"], 3) and target.dtype == np.uint8
        composite = Image.open(built / pair["composite_path"])
        assert composite.size == (pair["width"], pair["height"])
        crop = Image.open(built / pair["input_path"])
        assert crop.size == (pair["box_x1"] - pair["box_x0"], pair["box_y1"] - pair["box_y0"])
        alpha = Image.open(built / pair["alpha_path"])
        assert alpha.mode == "L" and alpha.size == composite.size
        trimap = np.asarray(Image.open(built / pair["trimap_path"]))
        assert set(np.unique(trimap)) <= {0, 128, 255} and (trimap == 255).any()
        assert pair["caption"] == f"a photo of a {pair['label_name'].lower()}" == pair["captions"][0]
        assert 0 < pair["foreground_fraction"] < 1 and 0 < pair["unknown_fraction"] < 1
        assert all(pair[f"{stage}_seconds"] >= 0 for stage in ("decode", "caption", "segment", "trimap", "matte"))
        assert pair["background"].startswith("kodim")
        assert all(pair[f"{kind}_path"].split("/")[1] == pair["image_id"][:2] for kind in IMAGE_KINDS)
    by_id = {p["image_id"]: p for p in read(built, "pairs.parquet")}
    rotated = by_id[image_id("exif-rotated")]
    assert (rotated["width"], rotated["height"]) == (160, 240), "EXIF orientation must be applied"


def test_the_composite_keeps_the_subject_and_replaces_the_background(built):
    pair = next(p for p in read(built, "pairs.parquet") if p["image_id"] == image_id("dog"))
    target = np.asarray(Image.open(built / pair["target_path"]), dtype=np.float64)
    composite = np.asarray(Image.open(built / pair["composite_path"]), dtype=np.float64)
    alpha = np.asarray(Image.open(built / pair["alpha_path"]), dtype=np.float64) / 255
    subject, background = alpha > 0.99, alpha < 0.01
    assert np.abs(composite - target)[subject].mean() < 6
    assert np.abs(composite - target)[background].mean() > 20


def test_same_seed_same_composites_other_seed_other_backgrounds(ray_cluster, dataset, built, tmp_path):
    again = tmp_path / "again"
    build_pairs(config_for(dataset, again))
    for pair in read(built, "pairs.parquet"):
        for kind in IMAGE_KINDS:
            assert (again / pair[f"{kind}_path"]).read_bytes() == (built / pair[f"{kind}_path"]).read_bytes()
    other = tmp_path / "other-seed"
    build_pairs(config_for(dataset, other, seed=1))
    first = {p["image_id"]: (p["background"], p["background_crop"]) for p in read(built, "pairs.parquet")}
    second = {p["image_id"]: (p["background"], p["background_crop"]) for p in read(other, "pairs.parquet")}
    assert first.keys() == second.keys() and first != second


def test_a_rerun_skips_finished_work_and_a_crash_loses_none(ray_cluster, dataset, built, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(built, out)
    summary = build_pairs(config_for(dataset, out))
    assert summary.skipped == 14 and summary.pairs == 8
    assert (out / "pairs.parquet").read_bytes() == (built / "pairs.parquet").read_bytes()

    # A crash: the journal ends mid-line after three finished subjects, the manifests are gone.
    lines = (out / "journal.jsonl").read_text().splitlines(keepends=True)
    kept = [json.loads(line)["image_id"] for line in lines[:3]]
    (out / "journal.jsonl").write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    (out / "pairs.parquet").unlink()
    (out / "rejects.parquet").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "composite").rglob("*.jpg")}
    summary = build_pairs(config_for(dataset, out))
    assert summary.skipped == 3
    assert without_timings(read(out, "pairs.parquet")) == without_timings(read(built, "pairs.parquet"))
    assert (out / "rejects.parquet").read_bytes() == (built / "rejects.parquet").read_bytes()
    for pair in read(built, "pairs.parquet"):
        for kind in IMAGE_KINDS:
            assert (out / pair[f"{kind}_path"]).read_bytes() == (built / pair[f"{kind}_path"]).read_bytes()
    for path, stamp in stamps.items():
        if path.stem in kept:
            assert path.stat().st_mtime_ns == stamp, "a finished pair was recomputed"
    assert not list(out.rglob(".tmp-*"))


def test_a_folder_never_mixes_two_builds(ray_cluster, dataset, built):
    with pytest.raises(ValueError, match="other settings.*seed"):
        build_pairs(config_for(dataset, built, seed=5))


def test_model_backends_load_from_folders_like_real_weights(ray_cluster, dataset, built, tmp_path):
    """BLIP-2 and CLIPSeg, as tiny random models saved to folders, run through the same build."""
    pytest.importorskip("torch")
    from tiny_models import save_tiny_blip2, save_tiny_clipseg

    blip2 = save_tiny_blip2(tmp_path / "blip2")
    clipseg = save_tiny_clipseg(tmp_path / "clipseg")
    subjects = tmp_path / "subjects.parquet"
    table = pq.read_table(dataset["subjects"])
    ids = {image_id(n) for n in ("dog", "cat", "missing")}
    pq.write_table(table.filter(pa.compute.is_in(table["image_id"], pa.array(sorted(ids)))), subjects)
    out = tmp_path / "out"
    config = BuildConfig(
        subjects=subjects, images=dataset["images"], backgrounds=dataset["backgrounds"], out=out,
        captioner="blip2", caption_model=str(blip2), segmenter="clipseg", segment_model=str(clipseg),
        device="cpu", trimap={"low": 0.5, "high": 0.5, "band": 0.0, "min_band_px": 1, "max_outside_box": 1.0},
    )
    build_pairs(config)
    pairs = read(out, "pairs.parquet")
    rejects = read(out, "rejects.parquet")
    assert {r["image_id"] for r in rejects} == {image_id("missing")}
    assert {p["image_id"] for p in pairs} == {image_id("dog"), image_id("cat")}
    for pair in pairs:
        assert isinstance(pair["caption"], str) and pair["caption"] == pair["captions"][0]
        assert pair["caption"] != f"a photo of a {pair['label_name'].lower()}"
        # CLIPSeg's map, not GrabCut's, decided the matte.
        assert (out / pair["alpha_path"]).read_bytes() != (built / pair["alpha_path"]).read_bytes()


def test_images_come_from_a_fetch_manifest_or_a_plain_folder(tmp_path):
    from blipdiff.datasets.build import image_paths

    ids = ["0123456789abcdef", "fedcba9876543210"]
    assert image_paths(tmp_path, ids) == {i: tmp_path / f"{i}.jpg" for i in ids}
    pq.write_table(pa.table({"image_id": [ids[0]], "path": ["images/01/0123456789abcdef.png"]}),
                   tmp_path / "images.parquet")
    assert image_paths(tmp_path, ids) == {ids[0]: tmp_path / "images/01/0123456789abcdef.png",
                                          ids[1]: tmp_path / f"{ids[1]}.jpg"}


def test_build_command_reports_bad_settings(tmp_path):
    import subprocess
    import sys

    blipdiff = Path(sys.executable).parent / "blipdiff"
    subjects = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pylist([subject_row("dog")]), subjects)
    done = subprocess.run([str(blipdiff), "build", "--subjects", str(subjects), "--images", str(tmp_path),
                           "--backgrounds", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "backgrounds folder not found" in done.stderr
    done = subprocess.run([str(blipdiff), "build", "--subjects", str(subjects), "--images", str(tmp_path),
                           "--backgrounds", str(tmp_path), "--out", str(tmp_path / "o"), "--trimap-low", "0.9"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "low threshold 0.9 exceeds high threshold 0.5" in done.stderr
