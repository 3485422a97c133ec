"""The build_pairs flow against a real temporary Prefect server and a real local Ray."""

from __future__ import annotations

import pandas as pd
import pytest

prefect_testing = pytest.importorskip("prefect.testing.utilities")

from blipdiff.datasets.samples import demo_annotations, write_demo_photos  # noqa: E402
from blipdiff.flows.build_pairs import BuildPairsParameters, build_pairs_flow  # noqa: E402


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_testing.prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_build_pairs_flow_runs_filter_fetch_build_and_reports(prefect_server, ray_cluster, tmp_path):
    from prefect.artifacts import Artifact

    photos, backgrounds = tmp_path / "photos", tmp_path / "backgrounds"
    photos.mkdir()
    backgrounds.mkdir()
    write_demo_photos(photos, backgrounds)
    boxes, classes = demo_annotations()
    parameters = BuildPairsParameters(boxes=boxes, classes=classes, backgrounds=backgrounds, data=tmp_path / "data",
                                      from_dir=photos, shard_size=2)
    result = build_pairs_flow(parameters)
    assert result == {"subjects": 3, "fetched": 3, "pairs": 3, "rejects": 0}
    pairs = pd.read_parquet(tmp_path / "data" / "pairs" / "pairs.parquet")
    assert sorted(pairs["label_name"]) == ["Cat", "Coffee cup", "Horse"]
    assert len(list((tmp_path / "data" / "pairs" / "shards").iterdir())) == 2

    funnel = Artifact.get("filter-funnel")
    assert funnel is not None and "group" in str(funnel.data)
    summary = Artifact.get("build-pairs-summary")
    assert summary is not None and "- pairs: 3" in str(summary.data)
    progress = Artifact.get("build-progress")
    assert progress is not None and float(progress.data) == 100.0

    again = build_pairs_flow(parameters)
    assert again == result
    assert pd.read_parquet(tmp_path / "data" / "pairs" / "pairs.parquet").equals(pairs)


def test_a_served_deployment_runs_when_triggered_with_parameters(prefect_server, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    photos, backgrounds = tmp_path / "photos", tmp_path / "backgrounds"
    photos.mkdir()
    backgrounds.mkdir()
    write_demo_photos(photos, backgrounds)
    boxes, classes = demo_annotations()
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    blipdiff = Path(sys.executable).parent / "blipdiff"
    server = subprocess.Popen([str(blipdiff), "serve", "--data", str(tmp_path / "data"), "--name", "test"],
                              env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while True:
                try:
                    client.read_deployment_by_name("build_pairs/test")
                    break
                except Exception:
                    assert time.monotonic() < deadline, "the deployment never appeared"
                    assert server.poll() is None, server.stderr.read().decode()
                    time.sleep(1)
        parameters = BuildPairsParameters(boxes=boxes, classes=classes, backgrounds=backgrounds,
                                          data=tmp_path / "triggered", from_dir=photos)
        run = run_deployment("build_pairs/test", parameters={"parameters": parameters.model_dump(mode="json")},
                             timeout=600)
        assert run.state.is_completed(), run.state
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    pairs = pd.read_parquet(tmp_path / "triggered" / "pairs" / "pairs.parquet")
    assert sorted(pairs["label_name"]) == ["Cat", "Coffee cup", "Horse"]
