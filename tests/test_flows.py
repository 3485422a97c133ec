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


@pytest.fixture
def demo_inputs(tmp_path):
    """The bundled sample: photos, backgrounds, box annotations and class descriptions."""
    photos, backgrounds = tmp_path / "photos", tmp_path / "backgrounds"
    photos.mkdir()
    backgrounds.mkdir()
    write_demo_photos(photos, backgrounds)
    return (photos, backgrounds, *demo_annotations())


def test_build_pairs_flow_runs_filter_fetch_build_catalog_and_reports(prefect_server, ray_cluster, demo_inputs,
                                                                       fiftyone_database, tmp_path):
    from prefect.artifacts import Artifact

    import shutil
    import time

    photos, backgrounds, bundled_boxes, classes = demo_inputs
    boxes = shutil.copy(bundled_boxes, tmp_path / "boxes.csv")
    parameters = BuildPairsParameters(boxes=boxes, classes=classes, backgrounds=backgrounds, data=tmp_path / "data",
                                      from_dir=photos, shard_size=2, dataset="flow-test")
    result = build_pairs_flow(parameters)
    assert result == {"subjects": 3, "fetched": 3, "pairs": 3, "rejects": 0, "dataset": "flow-test"}
    pairs = pd.read_parquet(tmp_path / "data" / "pairs.parquet")
    assert sorted(pairs["label_name"]) == ["Cat", "Coffee cup", "Horse"]
    shards = sorted((tmp_path / "data" / "shards").iterdir())
    assert [shard.name for shard in shards] == ["00000", "00001"]
    shard_pairs = pd.concat([pd.read_parquet(shard / "pairs.parquet") for shard in shards], ignore_index=True)
    assert shard_pairs.equals(pairs)

    funnel = Artifact.get("filter-funnel")
    assert funnel is not None and "group" in str(funnel.data)
    summary = Artifact.get("build-pairs-summary")
    assert summary is not None and "- pairs: 3" in str(summary.data)
    assert "FiftyOne dataset `flow-test` (3 pairs" in str(summary.data)
    assert "`blipdiff app --dataset flow-test`" in str(summary.data)
    import fiftyone as fo

    catalog = fo.load_dataset("flow-test")
    assert sorted(catalog.values("label")) == ["Cat", "Coffee cup", "Horse"]
    progress = Artifact.get("build-progress")
    assert progress is not None and float(progress.data) == 100.0

    # The rerun finds everything in place; from then on every stage's result comes from the cache.
    again = build_pairs_flow(parameters)
    assert again == {**result, "fetched": 0}
    assert pd.read_parquet(tmp_path / "data" / "pairs.parquet").equals(pairs)
    third = build_pairs_flow(parameters)
    assert third == again
    from collections import Counter

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterState, TaskRunFilterStateName

    def cached_runs() -> Counter:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(task_run_filter=TaskRunFilter(
                state=TaskRunFilterState(name=TaskRunFilterStateName(any_=["Cached"]))))
        return Counter(run.name.rsplit("-", 1)[0] for run in runs)

    cached = cached_runs()
    assert cached["filter"] >= 1 and cached["fetch"] >= 1 and cached["build shard"] >= 2

    # An edited annotation file (the same bytes, written anew) is a new input: the filter runs again.
    time.sleep(0.01)
    boxes.write_bytes(boxes.read_bytes())
    assert build_pairs_flow(parameters) == again
    after = cached_runs()
    assert after["filter"] == cached["filter"] and after["build shard"] == cached["build shard"] + 2
    assert len(catalog.select_group_slices(_allow_mixed=True)) == 3 * 5, "a rerun catalogues nothing twice"


def test_a_served_deployment_runs_when_triggered_with_parameters(prefect_server, demo_inputs, fiftyone_database,
                                                                  tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from blipdiff.flows.dreambench_eval import DreamBenchEvalParameters

    photos, backgrounds, boxes, classes = demo_inputs
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    blipdiff = Path(sys.executable).parent / "blipdiff"
    nightly = DreamBenchEvalParameters(model="Salesforce/blipdiffusion", dreambench=tmp_path / "dreambench",
                                       eval_root=tmp_path / "evals", subjects=["dog", "vase"], prompts=5)
    (tmp_path / "nightly.json").write_text(nightly.model_dump_json())
    server = subprocess.Popen([str(blipdiff), "serve", "--data", str(tmp_path / "data"), "--name", "test",
                               "--eval-parameters", str(tmp_path / "nightly.json"), "--eval-cron", "0 2 * * *",
                               "--timezone", "Europe/Paris"],
                              env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while True:
                try:
                    client.read_deployment_by_name("build_pairs/test")
                    client.read_deployment_by_name("pretrain/test")
                    evaluation = client.read_deployment_by_name("dreambench_eval/test")
                    break
                except Exception:
                    assert time.monotonic() < deadline, "the deployment never appeared"
                    assert server.poll() is None, server.stderr.read().decode()
                    time.sleep(1)
        # The nightly evaluation, read back through Prefect's API: its cron, time zone and form defaults.
        [schedule] = evaluation.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "Europe/Paris", True)
        assert evaluation.parameters["parameters"]["subjects"] == ["dog", "vase"]
        assert evaluation.parameters["parameters"]["model"] == "Salesforce/blipdiffusion"
        parameters = BuildPairsParameters(boxes=boxes, classes=classes, backgrounds=backgrounds,
                                          data=tmp_path / "triggered", from_dir=photos)
        run = run_deployment("build_pairs/test", parameters={"parameters": parameters.model_dump(mode="json")},
                             timeout=600)
        assert run.state.is_completed(), run.state
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    pairs = pd.read_parquet(tmp_path / "triggered" / "pairs.parquet")
    assert sorted(pairs["label_name"]) == ["Cat", "Coffee cup", "Horse"]


def test_a_run_killed_mid_build_resumes_to_the_pairs_of_an_uninterrupted_run(prefect_server, demo_inputs,
                                                                             fiftyone_database, tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    photos, backgrounds, boxes, classes = demo_inputs
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    script = ("import sys; from blipdiff.flows.build_pairs import BuildPairsParameters, build_pairs_flow; "
              "build_pairs_flow(BuildPairsParameters.model_validate_json(sys.argv[1]))")

    def start(data):
        parameters = BuildPairsParameters(boxes=boxes, classes=classes, backgrounds=backgrounds, data=data,
                                          from_dir=photos, shard_size=1)
        # A session of its own, so that the kill takes the flow and its local Ray together.
        return subprocess.Popen([sys.executable, "-c", script, parameters.model_dump_json()], env=environment,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    reference = start(tmp_path / "reference")
    assert reference.wait(timeout=600) == 0, reference.stderr.read().decode()[-3000:]

    data = tmp_path / "killed"
    run = start(data)
    journal = data / "journal.jsonl"
    deadline = time.monotonic() + 600
    while not (journal.exists() and journal.read_text().count("\n") >= 1):
        assert run.poll() is None, run.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=60)
    finished = [json.loads(line)["image_id"] for line in journal.read_text().splitlines() if line.endswith("}")]
    assert 1 <= len(finished) < 3, "the kill should land in the middle of the build"

    again = start(data)
    assert again.wait(timeout=600) == 0, again.stderr.read().decode()[-3000:]
    ids = [json.loads(line)["image_id"] for line in journal.read_text().splitlines()]
    assert all(ids.count(image_id) == 1 for image_id in finished), "a finished pair was built again"
    ours = pd.read_parquet(data / "pairs.parquet")
    expected = pd.read_parquet(tmp_path / "reference" / "pairs.parquet")
    timings = [c for c in expected.columns if c.endswith("_seconds")]
    pd.testing.assert_frame_equal(ours.drop(columns=timings), expected.drop(columns=timings))
    for column in ("target_path", "composite_path", "input_path", "alpha_path", "trimap_path"):
        for path in expected[column]:
            assert (data / path).read_bytes() == (tmp_path / "reference" / path).read_bytes()
    assert not list(data.rglob(".tmp-*")) and not list((data / "images").rglob(".partial"))


def test_the_pretrain_flow_trains_and_reports(prefect_server, ray_cluster, tmp_path):
    from helpers import write_pairs
    from prefect.artifacts import Artifact
    from tiny_models import save_tiny_blip_diffusion

    from blipdiff.flows.pretrain import pretrain_flow
    from blipdiff.tasks.pretrain.config import PretrainConfig

    pairs = write_pairs(tmp_path / "pairs")
    model = save_tiny_blip_diffusion(tmp_path / "model")
    parameters = PretrainConfig(pairs=[pairs], init=str(model), out=tmp_path / "run", steps=4, batch_size=2, lr=1e-3,
                                resolution=32, precision="fp32", checkpoint_every=2, validate_every=2,
                                validation_pairs=1, validation_steps=2, log_every=1)
    result = pretrain_flow(parameters)
    assert result["step"] == 4 and result["pairs"] == 5
    assert result["checkpoint"] == str(tmp_path / "run" / "checkpoints" / "step-0000004")
    progress = Artifact.get("pretrain-progress")
    assert progress is not None and float(progress.data) == 100.0
    summary = str(Artifact.get("pretrain-summary").data)
    assert "# pretrain: step 4 of 4" in summary and str(tmp_path / "run" / "checkpoints") in summary
    assert summary.count("](data:image/png;base64,") == 2, "the loss curve and the latest validation grid"
    assert "step-0000004" in summary and (tmp_path / "run" / "loss.png").is_file()
    # Triggered again, it finds the run finished and trains nothing.
    assert pretrain_flow(parameters) == result


def checkpointed_run(folder, step: int):
    """A `blipdiff pretrain` run folder with one complete checkpoint (a tiny random model) at ``step``."""
    import json

    from tiny_models import save_tiny_blip_diffusion

    from blipdiff.tasks.pretrain.config import CHECKPOINTS, STATE_FILE, TRAINING_STATE, checkpoint_name

    checkpoint = save_tiny_blip_diffusion(folder / CHECKPOINTS / checkpoint_name(step))
    (checkpoint / TRAINING_STATE).mkdir()
    (checkpoint / TRAINING_STATE / STATE_FILE).write_text(json.dumps({"step": step}))
    # A checkpoint still being written has no state file: never the one evaluated.
    (folder / CHECKPOINTS / checkpoint_name(step + 10)).mkdir()
    return folder


def test_the_dreambench_eval_flow_evaluates_the_newest_checkpoint_and_fails_on_a_regression(
        prefect_server, ray_cluster, fiftyone_database, tmp_path):
    from helpers import shared_path
    from prefect.artifacts import Artifact
    from tiny_models import save_tiny_clip, save_tiny_dino

    from blipdiff.flows.dreambench_eval import DreamBenchEvalParameters, dreambench_eval_flow
    from blipdiff.tasks.evaluation.history import append_run, pin_baseline, read_history

    run = checkpointed_run(tmp_path / "stage2", step=10)
    root = tmp_path / "evals"
    parameters = DreamBenchEvalParameters(
        training_run=run, eval_root=root, dreambench=shared_path("dreambench", "dataset"), subjects=["dog", "teapot"],
        prompts=1, images_per_prompt=2, steps=2, resolution=32, dino=str(save_tiny_dino(tmp_path / "dino")),
        clip=str(save_tiny_clip(tmp_path / "clip")), dataset="flow-dreambench")
    state = dreambench_eval_flow(parameters, return_state=True)
    assert state.is_completed(), state
    first = read_history(root)
    assert len(first) == 1 and first[0]["checkpoint_step"] == 10 and first[0]["images"] == 4
    assert first[0]["model"] == str((run / "checkpoints" / "step-0000010").resolve())
    run_folder = root / first[0]["run_id"]
    assert first[0]["run_id"].endswith("-step10") and (run_folder / "report.md").is_file()
    report = str(Artifact.get("dreambench-eval").data)
    assert "REGRESSED" not in report and "## Trend (comparable runs)" in report and "](data:image/png;base64," in report
    assert "FiftyOne dataset `flow-dreambench`" in report and str(run_folder) in report
    assert float(Artifact.get("dreambench-progress").data) == 100.0
    pin_baseline(root, first[0]["run_id"])

    # A better run before this one: the next run falls from it, by far more than seed noise.
    import datetime

    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    better = {**first[0], "run_id": "better", "time": now, "dino": first[0]["dino"] + 0.2,
              "per_subject": {s: {**v, "dino": v["dino"] + 0.2} for s, v in first[0]["per_subject"].items()}}
    append_run(root, better)
    regressed = dreambench_eval_flow(parameters, return_state=True)
    assert regressed.is_failed(), regressed
    assert "DreamBench regressed: dino dropped" in regressed.message
    report = str(Artifact.get("dreambench-eval").data)
    assert "# dreambench_eval REGRESSED" in report and "against the previous run better" in report
    assert "dog" in report.split("## What regressed")[1]
    assert len(read_history(root)) == 3
