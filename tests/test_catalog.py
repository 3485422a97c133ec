"""The FiftyOne catalog on a real database: FiftyOne's bundled MongoDB, in the tests' temporary database."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blipdiff.datasets.build import BuildConfig, build_pairs
from blipdiff.datasets.catalog import SAVED_VIEWS, SLICES, CatalogConfig, CatalogError, catalog_pairs
from blipdiff.datasets.samples import DEMO_PHOTOS, demo_image_id, write_demo_photos
from blipdiff.infra.mongodb import bundled_mongod, missing_libraries

BLIPDIFF = Path(sys.executable).parent / "blipdiff"
LABELS = {"chelsea": "Cat", "coffee": "Coffee cup", "horse": "Horse"}


def subject(image_id: str, label: str, box=(0.1, 0.9, 0.1, 0.9)) -> dict:
    x_min, x_max, y_min, y_max = box
    return {"image_id": image_id, "label_mid": f"/m/{label.lower().replace(' ', '')}", "label_name": label,
            "x_min": x_min, "x_max": x_max, "y_min": y_min, "y_max": y_max,
            "area": (x_max - x_min) * (y_max - y_min), "aspect": 1.0}


@pytest.fixture(scope="module")
def build_folder(tmp_path_factory) -> Path:
    """A real build on a local Ray: three pairs from the bundled photos, and two rejected subjects."""
    ray = pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("catalog-build")
    photos, backgrounds = root / "photos", root / "backgrounds"
    photos.mkdir()
    backgrounds.mkdir()
    write_demo_photos(photos, backgrounds)
    rows = [subject(demo_image_id(name), label) for name, label in LABELS.items()]
    assert set(LABELS) <= set(DEMO_PHOTOS)
    broken = hashlib.md5(b"zero-byte").hexdigest()[:16]
    (photos / f"{broken}.jpg").write_bytes(b"")
    rows += [subject(broken, "Teapot"), subject(hashlib.md5(b"missing").hexdigest()[:16], "Vase")]
    subjects = root / "subjects.parquet"
    pq.write_table(pa.Table.from_pylist(rows), subjects)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = root / "out"
        summary = build_pairs(BuildConfig(subjects=subjects, images=photos, backgrounds=backgrounds, out=out))
    finally:
        ray.shutdown()
    assert summary.pairs == 3 and sum(summary.rejects.values()) == 2
    return out


@pytest.fixture
def dataset_name(fiftyone_database, request) -> str:
    import fiftyone as fo

    name = f"catalog-{request.node.name[:40]}"
    yield name
    if fo.dataset_exists(name):
        fo.delete_dataset(name)


def every_sample(dataset):
    return dataset.select_group_slices(_allow_mixed=True)


def test_the_bundled_mongod_finds_every_library_it_needs():
    if not sys.platform.startswith("linux"):
        pytest.skip("the bundled mongod set-up is for Linux")
    assert missing_libraries(bundled_mongod()) == []


def test_a_plain_import_in_the_venv_reaches_a_working_database(fiftyone_database):
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("LD_LIBRARY_PATH", "FIFTYONE_DATABASE_URI")}
    script = ("import fiftyone as fo; d = fo.Dataset(); d.add_sample(fo.Sample(filepath='/x.jpg')); "
              "print('samples', len(d)); d.delete()")
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "samples 1" in done.stdout


def test_a_catalog_has_one_group_per_subject_with_its_slices_fields_and_views(build_folder, dataset_name):
    import fiftyone as fo

    summary = catalog_pairs(CatalogConfig(pairs=build_folder, dataset=dataset_name))
    assert (summary.pairs, summary.rejects, summary.added, summary.removed) == (3, 2, 5, 0)
    assert summary.app_command() == f"blipdiff app --dataset {dataset_name}"

    dataset = fo.load_dataset(dataset_name)
    assert dataset.persistent and dataset.media_type == "group"
    assert sorted(dataset.group_slices) == sorted(SLICES) and dataset.default_group_slice == "target"
    assert dataset.info["pairs_folder"] == str(build_folder.resolve())
    assert dataset.mask_targets["trimap"] == {0: "background", 128: "unknown", 255: "foreground"}
    samples = every_sample(dataset)
    assert len(samples) == 3 * len(SLICES) + 2
    assert len(set(samples.values("group.id"))) == 5

    pairs = {row["image_id"]: row for row in pq.read_table(build_folder / "pairs.parquet").to_pylist()}
    for image_id, row in pairs.items():
        group = dataset.get_group(dataset.match({"image_id": image_id}).first().group.id)
        assert sorted(group) == sorted(SLICES)
        for kind, sample in group.items():
            assert sample.filepath == str(build_folder.resolve() / row[f"{kind}_path"])
            assert Path(sample.filepath).is_file()
            assert (sample.status, sample.label, sample.caption) == ("pair", row["label_name"], row["caption"])
            assert sample.captions == row["captions"]
            assert sample.foreground_fraction == row["foreground_fraction"]
            assert sample.unknown_fraction == row["unknown_fraction"]
            assert sample.matte_seconds == row["matte_seconds"]
        target = group["target"]
        [detection] = target.subject.detections
        assert detection.label == row["label_name"]
        x, y, w, h = detection.bounding_box
        assert x * row["width"] == pytest.approx(row["box_x0"]) and (x + w) * row["width"] == pytest.approx(row["box_x1"])
        assert y * row["height"] == pytest.approx(row["box_y0"]) and (y + h) * row["height"] == pytest.approx(row["box_y1"])
        # Paths, never pixels: the masks stay on disk.
        alpha = group["alpha"].matte
        assert alpha.map is None and alpha.map_path == group["alpha"].filepath and list(alpha.range) == [0, 255]
        trimap = group["trimap"].trimap
        assert trimap.mask is None and trimap.mask_path == group["trimap"].filepath
        assert target.trimap.mask_path == trimap.mask_path and target.matte.map_path == alpha.map_path

    rejected = dataset.match_tags("rejected")
    assert len(rejected) == 2
    reasons = dict(zip(rejected.values("label"), rejected.values("reject_reason"), strict=True))
    assert reasons == {"Teapot": "empty file", "Vase": "missing file"}
    assert set(rejected.values("reject_stage")) == {"decode"} and set(rejected.values("status")) == {"rejected"}
    assert all(Path(path).name.endswith(".jpg") for path in rejected.values("filepath"))

    assert set(dataset.list_saved_views()) == set(SAVED_VIEWS)
    widest = dataset.load_saved_view("largest-unknown-band").values("unknown_fraction")
    assert widest == sorted((row["unknown_fraction"] for row in pairs.values()), reverse=True)
    smallest = dataset.load_saved_view("smallest-foreground").values("foreground_fraction")
    assert smallest == sorted(row["foreground_fraction"] for row in pairs.values())
    by_class = dataset.load_saved_view("by-class")
    assert sorted(group.first().label for group in by_class.iter_dynamic_groups()) == sorted(LABELS.values())
    assert len(dataset.load_saved_view("rejected")) == 2


def test_cataloguing_again_keeps_one_group_per_subject_and_adds_only_what_is_new(build_folder, dataset_name,
                                                                                tmp_path):
    import fiftyone as fo

    folder = tmp_path / "build"
    shutil.copytree(build_folder, folder)
    full = pq.read_table(folder / "pairs.parquet")
    pq.write_table(full.slice(0, 1), folder / "pairs.parquet")
    first = catalog_pairs(CatalogConfig(pairs=folder, dataset=dataset_name))
    assert (first.pairs, first.added) == (1, 3)

    pq.write_table(full, folder / "pairs.parquet")
    second = catalog_pairs(CatalogConfig(pairs=folder, dataset=dataset_name))
    assert (second.added, second.removed) == (2, 0)
    third = catalog_pairs(CatalogConfig(pairs=folder, dataset=dataset_name))
    assert (third.added, third.removed) == (0, 0)
    dataset = fo.load_dataset(dataset_name)
    samples = every_sample(dataset)
    assert len(samples) == 3 * len(SLICES) + 2 and len(set(samples.values("group.id"))) == 5
    assert sorted(samples.count_values("image_id").values()) == [1, 1, 5, 5, 5]

    # A group cut short (a crash between two slices) is replaced whole.
    cut = dataset.get_group(dataset.match({"status": "pair"}).first().group.id)
    dataset.delete_samples([cut["composite"].id])
    assert sorted(every_sample(dataset).count_values("image_id").values()) == [1, 1, 4, 5, 5]
    fourth = catalog_pairs(CatalogConfig(pairs=folder, dataset=dataset_name))
    assert (fourth.added, fourth.removed) == (1, 1)
    assert sorted(every_sample(dataset).count_values("image_id").values()) == [1, 1, 5, 5, 5]

    # A second group for one subject (two catalogue runs racing, say): both go, one comes back.
    target = dataset.match({"status": "pair"}).first()
    dataset.add_sample(fo.Sample(filepath=target.filepath, group=fo.Group().element("target"),
                                 image_id=target.image_id, status="pair"))
    sixth = catalog_pairs(CatalogConfig(pairs=folder, dataset=dataset_name))
    assert (sixth.added, sixth.removed) == (1, 2)
    assert sorted(every_sample(dataset).count_values("image_id").values()) == [1, 1, 5, 5, 5]
    assert len(set(every_sample(dataset).values("group.id"))) == 5

    # A subject that the manifests no longer hold leaves the catalog.
    pq.write_table(full.slice(0, 2), folder / "pairs.parquet")
    fifth = catalog_pairs(CatalogConfig(pairs=folder, dataset=dataset_name))
    assert (fifth.added, fifth.removed) == (0, 1)
    assert len(set(every_sample(dataset).values("group.id"))) == 4


def test_a_dataset_never_mixes_two_builds(build_folder, dataset_name, tmp_path):
    catalog_pairs(CatalogConfig(pairs=build_folder, dataset=dataset_name))
    other = tmp_path / "other"
    shutil.copytree(build_folder, other)
    with pytest.raises(CatalogError, match="choose another --dataset, or --replace it"):
        catalog_pairs(CatalogConfig(pairs=other, dataset=dataset_name))
    replaced = catalog_pairs(CatalogConfig(pairs=other, dataset=dataset_name, replace=True))
    assert replaced.added == 5
    with pytest.raises(CatalogError, match="pairs.parquet is missing"):
        catalog_pairs(CatalogConfig(pairs=tmp_path / "nothing", dataset=dataset_name))


def test_the_catalog_command_prints_the_dataset_and_how_to_open_it(build_folder, dataset_name, tmp_path):
    done = subprocess.run([str(BLIPDIFF), "catalog", "--pairs", str(build_folder), "--dataset", dataset_name],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"blipdiff app --dataset {dataset_name}" in done.stdout and "rejected subjects" in done.stdout
    failed = subprocess.run([str(BLIPDIFF), "catalog", "--pairs", str(tmp_path), "--dataset", dataset_name],
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2 and "pairs.parquet is missing" in failed.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_app_command_serves_the_app_on_loopback(build_folder, dataset_name):
    catalog_pairs(CatalogConfig(pairs=build_folder, dataset=dataset_name))
    missing = subprocess.run([str(BLIPDIFF), "app", "--dataset", "no-such-dataset"], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2 and "no dataset 'no-such-dataset'" in missing.stderr

    port = free_port()
    app = subprocess.Popen([str(BLIPDIFF), "app", "--dataset", dataset_name, "--port", str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/datasets/{dataset_name}", timeout=5) as page:
                    assert page.status == 200 and b"FiftyOne" in page.read()
                    break
            except OSError:
                assert app.poll() is None, app.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "the App never answered"
                time.sleep(1)
        # What the App's front end asks its server for: the dataset, its slices and its saved views.
        query = ('{ dataset(name: "%s") { defaultGroupSlice groupMediaTypes { name mediaType } '
                 'savedViews { name } estimatedSampleCount } }' % dataset_name)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = json.loads(response.read())["data"]["dataset"]
        assert served["defaultGroupSlice"] == "target"
        assert {s["name"]: s["mediaType"] for s in served["groupMediaTypes"]} == dict.fromkeys(SLICES, "image")
        assert {view["name"] for view in served["savedViews"]} == set(SAVED_VIEWS)
        assert served["estimatedSampleCount"] == 3 * len(SLICES) + 2
    finally:
        os.killpg(app.pid, 15)
        app.wait(timeout=60)


def test_an_external_mongodb_named_by_fiftyone_database_uri_is_used(build_folder, tmp_path):
    """A team's MongoDB: here a second mongod on a port of its own, with nothing of FiftyOne's own."""
    pymongo = pytest.importorskip("pymongo")
    port = free_port()
    (tmp_path / "db").mkdir()
    mongod = subprocess.Popen([str(bundled_mongod()), "--dbpath", str(tmp_path / "db"), "--port", str(port),
                               "--bind_ip", "127.0.0.1", "--nounixsocket"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"mongodb://127.0.0.1:{port}"
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=60_000)
        client.admin.command("ping")
        environment = {**os.environ, "FIFTYONE_DATABASE_URI": uri, "FIFTYONE_DATABASE_NAME": "team"}
        done = subprocess.run([str(BLIPDIFF), "catalog", "--pairs", str(build_folder), "--dataset", "shared"],
                              env=environment, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        datasets = client["team"]["datasets"].find_one({"name": "shared"})
        assert datasets is not None, "the dataset should live in the external MongoDB"
        client.close()
    finally:
        mongod.terminate()
        mongod.wait(timeout=60)
