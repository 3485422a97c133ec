"""Image acquisition against a loopback server with injected faults, from a folder, and kill-and-resume."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from helpers import shared_path
from imageserver import ImageServer, photo_id
from PIL import Image

from blipdiff.datasets.fetch import FetchConfig, fetch_images

BLIPDIFF = Path(sys.executable).parent / "blipdiff"
INVALID_IDS = [
    "../../../../etc/passwd", "/etc/passwd", "0123456789abcdeF", "0123456789abcde/", "0123456789abcdef0",
    "..%2f..%2fetc%2fpasswd", "", "0123456789abcde\n",
]


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    root = shared_path("dreambench", "dataset")
    paths = sorted(root.glob("*/0[0-1].jpg"))[:24]
    assert len(paths) >= 20
    return {photo_id(path): path.read_bytes() for path in paths}


def write_subjects(path: Path, ids: list[str]) -> Path:
    pq.write_table(pa.table({"image_id": pa.array(ids, pa.string())}), path)
    return path


def manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "images.parquet").to_pylist()


def rejects(out: Path) -> dict[str, tuple[str, str]]:
    return {r["image_id"]: (r["stage"], r["reason"]) for r in pq.read_table(out / "rejects.parquet").to_pylist()}


def files_below(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_images_identical(out: Path, photos: dict[str, bytes], ids) -> None:
    records = {r["image_id"]: r for r in manifest(out)}
    for image_id in ids:
        record = records[image_id]
        data = (out / record["path"]).read_bytes()
        assert data == photos[image_id]
        assert record["bytes"] == len(data) and record["md5"] == hashlib.md5(data).hexdigest()
        with Image.open(out / record["path"]) as image:
            assert (record["width"], record["height"]) == image.size


def test_faults_are_rejected_with_reasons_and_healthy_images_arrive_intact(tmp_path, photos):
    ids = sorted(photos)
    faults = dict(zip(ids, [
        "500-then-200", "always-500", "404", "drop-mid-body", "drop-once", "long-content-length",
        "short-content-length", "slow", "html", "html-as-jpeg", "not-an-image",
    ], strict=False))
    healthy = [i for i in ids if faults.get(i, "ok") in ("ok", "500-then-200", "drop-once")]
    with ImageServer(photos, slow_seconds=4.0) as server:
        server.faults.update(faults)
        out = tmp_path / "images"
        config = FetchConfig(
            subjects=write_subjects(tmp_path / "subjects.parquet", ids + INVALID_IDS), out=out,
            url_template=server.url_template, timeout=1.0, retries=2, backoff=0.01, workers=4,
        )
        summary = fetch_images(config)
        requests = dict(server.requests)

    assert summary.fetched == len(healthy) and summary.skipped == 0
    assert_images_identical(out, photos, healthy)
    by_fault = {faults[i]: reason for i, reason in rejects(out).items() if i in faults}
    assert by_fault == {
        "always-500": ("download", "HTTP 500 (3 tries)"),
        "404": ("download", "HTTP 404"),
        "drop-mid-body": ("download", by_fault["drop-mid-body"][1]),
        "long-content-length": ("download", by_fault["long-content-length"][1]),
        "short-content-length": ("decode", by_fault["short-content-length"][1]),
        "slow": ("download", "timed out (ReadTimeout, 1 s) (3 tries)"),
        "html": ("download", "HTML page instead of an image"),
        "html-as-jpeg": ("decode", "HTML page instead of an image"),
        "not-an-image": ("decode", "not an image Pillow can identify"),
    }
    assert by_fault["drop-mid-body"][1].startswith("connection broke mid-response")
    assert by_fault["long-content-length"][1].startswith("connection broke mid-response")
    assert "(3 tries)" in by_fault["drop-mid-body"][1] and "(3 tries)" in by_fault["long-content-length"][1]
    assert "truncated" in by_fault["short-content-length"][1]
    invalid = {i: r for i, r in rejects(out).items() if i not in photos}
    assert invalid == {i: ("id", "image id is not 16 lowercase hex digits") for i in INVALID_IDS}

    # Retries: only after a 5xx or a broken transfer, never after a 4xx.
    by_id = {faults.get(i, "ok"): requests.get(i, 0) for i in ids}
    assert by_id["404"] == 1 and by_id["always-500"] == 3 and by_id["500-then-200"] == 2
    assert by_id["drop-once"] == 2 and by_id["ok"] == 1
    assert set(requests) <= set(ids), "an invalid id reached the network"

    expected_files = {r["path"] for r in manifest(out)} | {"images.parquet", "rejects.parquet", "journal.jsonl"}
    assert set(files_below(out)) == expected_files
    assert all(len(Path(p).parts) == 3 and Path(p).parts[1] == Path(p).stem[:2] for p in expected_files if p.startswith("images/"))


def test_a_rerun_skips_what_is_done_and_writes_the_same_manifest(tmp_path, photos):
    ids = sorted(photos)[:8]
    with ImageServer(photos) as server:
        server.faults[ids[0]] = "404"
        config = FetchConfig(subjects=write_subjects(tmp_path / "s.parquet", ids), out=tmp_path / "out",
                             url_template=server.url_template, backoff=0.01, workers=3)
        first = fetch_images(config)
        manifest_bytes = (tmp_path / "out" / "images.parquet").read_bytes()
        second = fetch_images(config)
        requests = dict(server.requests)
    assert (first.fetched, first.skipped) == (7, 0)
    assert (second.fetched, second.skipped) == (0, 7)
    assert all(requests[i] == 1 for i in ids[1:])
    assert requests[ids[0]] == 2, "a rejected image is tried again on a rerun"
    assert (tmp_path / "out" / "images.parquet").read_bytes() == manifest_bytes


def test_kill_and_resume_ends_with_the_bytes_of_an_uninterrupted_run(tmp_path, photos):
    ids = sorted(photos)[:16]
    subjects = write_subjects(tmp_path / "subjects.parquet", ids)
    with ImageServer(photos, pace_seconds=0.25) as server:
        def fetch(out: Path, **kwargs) -> subprocess.Popen:
            command = [str(BLIPDIFF), "fetch", "--subjects", str(subjects), "--out", str(out),
                       "--url-template", server.url_template, "--workers", "2", "--no-ray"]
            return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)

        reference = tmp_path / "uninterrupted"
        assert fetch(reference).wait(timeout=120) == 0

        resumed = tmp_path / "resumed"
        process = fetch(resumed)
        journal = resumed / "journal.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_text().count("\n") >= 4:
                break
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        finished = journal.read_text().count("\n")
        assert 4 <= finished < len(ids), "the kill should land mid-run"
        for path in (resumed / "images").rglob("*.jpg"):
            assert path.read_bytes() == photos[path.stem], f"partial file at a final path: {path}"
        assert not (resumed / "images.parquet").exists()

        requests_before = dict(server.requests)
        assert fetch(resumed).wait(timeout=120) == 0
        refetched = {i for i in ids if server.requests[i] > requests_before.get(i, 0)}

    done_before = {json.loads(line)["image_id"] for line in journal.read_text().splitlines()[:finished]}
    assert not refetched & done_before, "finished images were downloaded again"
    assert files_below(resumed) == files_below(reference)
    for name in files_below(reference):
        if name != "journal.jsonl":
            assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name


def test_from_dir_applies_the_same_checks(tmp_path, photos):
    ids = sorted(photos)[:6]
    source = tmp_path / "mine"
    (source / "nested").mkdir(parents=True)
    for n, image_id in enumerate(ids[:3]):
        folder = source / "nested" if n == 0 else source
        (folder / f"{image_id}.jpg").write_bytes(photos[image_id])
    truncated, empty, text, html, rotated, missing = (f"{n:016x}" for n in range(1, 7))
    (source / f"{truncated}.jpg").write_bytes(photos[ids[3]][: len(photos[ids[3]]) // 2])
    (source / f"{empty}.jpg").write_bytes(b"")
    (source / f"{text}.png").write_bytes(b"just some text, not a picture\n" * 10)
    (source / f"{html}.jpg").write_bytes(b"<!doctype html><html></html>")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 32), "red").save(source / f"{rotated}.jpg", exif=exif)
    (source / "not-an-id.jpg").write_bytes(photos[ids[4]])

    wanted = ids[:3] + [truncated, empty, text, html, rotated, missing]
    out = tmp_path / "out"
    summary = fetch_images(FetchConfig(subjects=write_subjects(tmp_path / "s.parquet", wanted), out=out,
                                       from_dir=source))
    assert summary.fetched == 4
    assert_images_identical(out, photos, ids[:3])
    records = {r["image_id"]: r for r in manifest(out)}
    assert (records[rotated]["width"], records[rotated]["height"]) == (32, 64)
    assert records[ids[0]]["source"] == str(source / "nested" / f"{ids[0]}.jpg")
    reasons = rejects(out)
    assert reasons[truncated][0] == "decode" and "truncated" in reasons[truncated][1]
    assert reasons[empty] == ("decode", "empty file")
    assert reasons[text] == ("decode", "not an image Pillow can identify")
    assert reasons[html] == ("decode", "HTML page instead of an image")
    assert reasons[missing] == ("source", f"no image file named {missing}.* in --from-dir")
    assert set(files_below(out)) == {r["path"] for r in records.values()} | {
        "images.parquet", "rejects.parquet", "journal.jsonl"}


def test_images_csv_urls_and_md5(tmp_path, photos):
    ids = sorted(photos)[:5]
    with ImageServer(photos) as server:
        base = server.url_template.replace("{split}", "train")
        rows = []
        for n, image_id in enumerate(ids[:4]):
            md5 = hashlib.md5(photos[image_id]).digest()
            if n == 1:
                md5 = hashlib.md5(b"something else").digest()
            rows.append({
                "ImageID": image_id, "Subset": "train", "OriginalURL": base.format(image_id=image_id),
                "OriginalMD5": base64.b64encode(md5).decode(), "Thumbnail300KURL": "" if n == 2 else
                base.format(image_id=image_id), "Rotation": "0.0",
            })
        images_csv = tmp_path / "images.csv"
        pa_csv.write_csv(pa.Table.from_pylist(rows), images_csv)
        subjects = write_subjects(tmp_path / "s.parquet", ids)

        out = tmp_path / "originals"
        summary = fetch_images(FetchConfig(subjects=subjects, out=out, images_csv=images_csv, backoff=0.01))
        assert summary.fetched == 3
        assert rejects(out)[ids[1]][0] == "download" and "differs from the images CSV" in rejects(out)[ids[1]][1]
        assert rejects(out)[ids[4]] == ("source", "not in the images CSV")
        assert {r["source"] for r in manifest(out)} == {base.format(image_id=i) for i in (ids[0], ids[2], ids[3])}

        thumbs = tmp_path / "thumbnails"
        fetch_images(FetchConfig(subjects=subjects, out=thumbs, images_csv=images_csv, thumbnails=True))
        assert rejects(thumbs)[ids[2]] == ("source", "no Thumbnail300KURL in the images CSV")
        assert {r["image_id"] for r in manifest(thumbs)} == {ids[0], ids[1], ids[3]}


def test_ray_fan_out_gives_the_same_manifest(tmp_path, photos, monkeypatch):
    ray = pytest.importorskip("ray")
    from blipdiff.datasets import fetch

    in_this_process = []
    threads = fetch.run_jobs

    def recorded(config, jobs, on_done):
        in_this_process.append(config.out.name)
        return threads(config, jobs, on_done)

    # Ray's workers import the module afresh: only a run that stays in this process is recorded.
    monkeypatch.setattr(fetch, "run_jobs", recorded)
    ids = sorted(photos)[:12]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with ImageServer(photos) as server:
            server.faults[ids[0]] = "404"
            common = dict(subjects=write_subjects(tmp_path / "s.parquet", ids), url_template=server.url_template,
                          backoff=0.01, workers=2, ray_shard=4)
            fetch_images(FetchConfig(out=tmp_path / "threads", ray=False, **common))
            fetch_images(FetchConfig(out=tmp_path / "ray", ray=True, **common))
    finally:
        ray.shutdown()
    for name in ("images.parquet", "rejects.parquet"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "threads" / name).read_bytes()
    assert len(manifest(tmp_path / "ray")) == 11
    assert in_this_process == ["threads"], "the Ray run should do its downloads in Ray's workers"


def test_a_deleted_or_truncated_image_is_fetched_again_and_size_limits_hold(tmp_path, photos):
    ids = sorted(photos)[:3]
    source = tmp_path / "mine"
    source.mkdir()
    for image_id in ids:
        (source / f"{image_id}.jpg").write_bytes(photos[image_id])
    subjects = write_subjects(tmp_path / "s.parquet", ids)
    out = tmp_path / "out"
    fetch_images(FetchConfig(subjects=subjects, out=out, from_dir=source))
    paths = {r["image_id"]: out / r["path"] for r in manifest(out)}
    paths[ids[0]].unlink()
    paths[ids[1]].write_bytes(photos[ids[1]][:100])
    again = fetch_images(FetchConfig(subjects=subjects, out=out, from_dir=source))
    assert (again.fetched, again.skipped) == (2, 1)
    assert_images_identical(out, photos, ids)

    small = min(len(photos[i]) for i in ids) - 1
    limited = fetch_images(FetchConfig(subjects=subjects, out=tmp_path / "small", from_dir=source, max_bytes=small))
    assert limited.fetched == 0
    assert {reason for _, reason in rejects(tmp_path / "small").values()} == {
        f"{len(photos[i])} bytes exceeds the {small}-byte limit" for i in ids}
    with ImageServer(photos) as server:
        fetch_images(FetchConfig(subjects=subjects, out=tmp_path / "served", url_template=server.url_template,
                                 max_bytes=small, backoff=0.01))
    assert {reason for _, reason in rejects(tmp_path / "served").values()} == {
        f"Content-Length {len(photos[i])} exceeds the {small}-byte limit" for i in ids}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--from-dir", ".", "--images-csv", "x.csv"], "choose one source"),
        (["--thumbnails"], "--thumbnails needs --images-csv"),
        (["--url-template", "http://127.0.0.1/{id}.jpg"], "must contain {image_id}"),
    ],
)
def test_inconsistent_options_are_clear_errors(tmp_path, options, message):
    subjects = write_subjects(tmp_path / "s.parquet", ["0" * 16])
    done = subprocess.run([str(BLIPDIFF), "fetch", "--subjects", str(subjects), "--out", str(tmp_path / "o"), *options],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr
