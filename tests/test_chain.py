"""The chain through events and triggers, against a real Prefect server (which runs the triggers and their
actions), `blipdiff serve` in a subprocess, and a real local Ray that the served runs join."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

prefect_testing = pytest.importorskip("prefect.testing.utilities")

from blipdiff.datasets.samples import demo_annotations, write_demo_dreambench, write_demo_photos  # noqa: E402
from blipdiff.flows.build_pairs import BuildPairsParameters  # noqa: E402
from blipdiff.flows.chain import ChainConfig, CheckpointEvaluation, PretrainPlan  # noqa: E402

EVERY = 2  # K: the chain evaluates the 2nd, 4th, ... checkpoint of a run


def sample_build(folder: Path, data: Path) -> BuildPairsParameters:
    photos, backgrounds = folder / "photos", folder / "backgrounds"
    photos.mkdir(parents=True, exist_ok=True)
    backgrounds.mkdir(parents=True, exist_ok=True)
    write_demo_photos(photos, backgrounds)
    boxes, classes = demo_annotations()
    return BuildPairsParameters(boxes=boxes, classes=classes, backgrounds=backgrounds, data=data, from_dir=photos,
                                dataset=f"chain-{data.name}")


def flow_runs(deployment: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])))


def wait_for(condition, what: str, served, timeout: float = 900):
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        assert served.poll() is None, served.log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(2)


def task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@pytest.fixture(scope="module")
def served(tmp_path_factory, fiftyone_database):
    """A Prefect server, one local Ray, small random models, and `blipdiff serve --chain` with K = 2."""
    import ray
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from blipdiff.infra.demo import demo_models

    folder = tmp_path_factory.mktemp("chain")
    models = demo_models(folder / "models")
    bench = write_demo_dreambench(folder / "dreambench")
    chain = ChainConfig(
        pretrain=PretrainPlan(init=str(models["blip-diffusion"]), out=folder / "runs", steps=3, batch_size=2,
                              lr=1e-4, resolution=32, precision="fp32", gradient_checkpointing=False,
                              checkpoint_every=1, keep_checkpoints=0, validate_every=0, validation_pairs=0,
                              log_every=1),
        evaluation=CheckpointEvaluation(eval_root=folder / "evals", dreambench=bench, subjects=["cat"], prompts=1,
                                        images_per_prompt=1, steps=2, resolution=32, dino=str(models["dino"]),
                                        clip=str(models["clip"]), dataset="chain-dreambench"),
        evaluate_every=EVERY)
    (folder / "chain.json").write_text(chain.model_dump_json())
    with prefect_testing.prefect_test_harness(server_startup_timeout=300):
        context = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
                       "RAY_ADDRESS": context.address_info["gcs_address"]}
        blipdiff = Path(sys.executable).parent / "blipdiff"
        # A file, not a pipe: nobody reads a pipe while the chain runs, and a full one would stall serve.
        serve_log = folder / "serve.log"
        process = subprocess.Popen([str(blipdiff), "serve", "--data", str(folder), "--name", "test",
                                    "--chain", str(folder / "chain.json")],
                                   env=environment, stdout=subprocess.DEVNULL, stderr=serve_log.open("wb"),
                                   start_new_session=True)
        process.log = serve_log  # what wait_for shows when serve has died
        os.environ["RAY_ADDRESS"] = context.address_info["gcs_address"]
        try:
            def deployed():
                with get_client(sync_client=True) as client:
                    try:
                        return [client.read_deployment_by_name(f"{flow}/test")
                                for flow in ("build_pairs", "pretrain", "dreambench_eval")]
                    except Exception:
                        return None

            wait_for(deployed, "the served deployments", process, timeout=300)
            yield SimpleNamespace(folder=folder, chain=chain, models=models, bench=bench, process=process)
        finally:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
            finally:
                os.environ.pop("RAY_ADDRESS", None)
                ray.shutdown()


def flow_run_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]


def flow_run_by_id(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def training_tasks(flow_run_id) -> list:
    return [task for task in task_runs(flow_run_id) if task.name.startswith("pretrain")]


@pytest.fixture(scope="module")
def chained(served):
    """A build of the bundled sample, run as a user would, and what its events start. The checks of a failed
    pretrain and of the GPU limit ride along, so that the module starts as few flow runs as it can: while
    this process holds the only GPU slot, a pretrain that cannot start its model is run too, and the
    pretrain that the build triggered must wait."""
    from prefect.concurrency.sync import concurrency
    from prefect.deployments import run_deployment

    from blipdiff.flows.build_pairs import build_pairs_flow
    from blipdiff.flows.gpu import GPU_LIMIT

    data = served.folder / "data"
    run = served.folder / "runs" / "data"
    with concurrency(GPU_LIMIT, occupy=1, strict=True):
        assert build_pairs_flow(sample_build(served.folder / "sample", data))["pairs"] == 3
        # A starting model that is no checkpoint: the run fails before it writes any.
        broken = served.folder / "broken-model"
        broken.mkdir()
        failing = served.chain.pretrain.for_pairs(data).model_dump(mode="json")
        failing.update(init=str(broken), out=str(served.folder / "runs" / "failed"))
        failed = run_deployment("pretrain/test", parameters={"parameters": failing}, timeout=0)
        [pretrain] = wait_for(lambda: [r for r in flow_runs("pretrain/test")
                                       if r.parameters["parameters"]["out"] == str(run)],
                              "the triggered pretrain", served.process)
        wait_for(lambda: any("waiting for a slot" in message for message in flow_run_logs(pretrain.id)),
                 "the triggered pretrain to ask for the GPU", served.process)
        # Long enough for an unenforced limit to let it through: it asked, and it must still be waiting.
        time.sleep(5)
        gpu_waited = not training_tasks(pretrain.id) and not any(
            "got a GPU slot" in message for message in flow_run_logs(pretrain.id))
        released = time.time()
    pretrain = wait_for(lambda: (found := flow_run_by_id(pretrain.id)).state.is_final() and found,
                        "the pretrain to finish", served.process)
    failed = wait_for(lambda: (found := flow_run_by_id(failed.id)).state.is_final() and found,
                      "the failing pretrain to end", served.process)
    evaluations = wait_for(lambda: [r for r in flow_runs("dreambench_eval/test") if r.state.is_final()],
                           "the triggered evaluation", served.process)
    # Time enough for a stray trigger (on the 3rd checkpoint, announced before the 2nd's evaluation
    # finished, or on anything of the failed run): the triggers see every event within seconds.
    time.sleep(15)
    return SimpleNamespace(data=data, pretrain=pretrain, failed=failed, evaluations=evaluations,
                           gpu_waited=gpu_waited, released=released)


def test_a_build_starts_pretrain_on_its_folder(served, chained):
    run = chained.pretrain
    assert run.state.is_completed(), run.state
    parameters = run.parameters["parameters"]
    assert parameters["pairs"] == [str(chained.data.resolve())]
    assert parameters["out"] == str(served.folder / "runs" / "data")
    assert parameters["init"] == str(served.models["blip-diffusion"]) and parameters["steps"] == 3
    checkpoints = sorted(path.name for path in (served.folder / "runs" / "data" / "checkpoints").iterdir())
    assert checkpoints == ["step-0000001", "step-0000002", "step-0000003"]


def test_only_the_kth_checkpoints_start_an_evaluation(served, chained):
    from blipdiff.tasks.evaluation.history import read_history

    # Checkpoints 1, 2 and 3 were written; with K = 2 only the 2nd is evaluated.
    runs = flow_runs("dreambench_eval/test")
    checkpoint = served.folder / "runs" / "data" / "checkpoints" / "step-0000002"
    assert [run.parameters["parameters"]["model"] for run in runs] == [str(checkpoint.resolve())]
    assert runs[0].state.is_completed(), runs[0].state
    assert runs[0].parameters["parameters"]["subjects"] == ["cat"], "the chain's cheap tier"
    [evaluated] = read_history(served.folder / "evals")
    assert evaluated["checkpoint_step"] == 2 and evaluated["images"] == 1


def test_a_failed_pretrain_starts_nothing_downstream(served, chained):
    assert chained.failed.state.is_failed(), chained.failed.state
    assert not (served.folder / "runs" / "failed" / "checkpoints").exists()
    # The one evaluation is the triggered run's 2nd checkpoint's: the failed run started none.
    failed_run = str(served.folder / "runs" / "failed")
    assert not [run for run in flow_runs("dreambench_eval/test")
                if run.parameters["parameters"]["model"].startswith(failed_run)]
    assert len(flow_runs("dreambench_eval/test")) == 1


def test_the_gpu_limit_makes_a_second_gpu_flow_wait(served, chained):
    # The triggered pretrain asked for the GPU while this process held the only slot: it waited, and its
    # training began only once the slot was free.
    assert chained.gpu_waited, "the training started while another stage held the GPU"
    [training] = training_tasks(chained.pretrain.id)
    assert training.start_time.timestamp() >= chained.released


def test_the_pipeline_runs_the_chain_as_one_run_and_leaves_the_triggers_alone(served, chained):
    from blipdiff.flows.chain import PipelineParameters, blip_diffusion_pipeline
    from blipdiff.tasks.evaluation.history import read_history

    data = served.folder / "pipeline-data"
    evaluation = served.chain.evaluation.model_copy(update={"eval_root": served.folder / "pipeline-evals"})
    parameters = PipelineParameters(build=sample_build(served.folder / "sample", data),
                                    pretrain=served.chain.pretrain.model_copy(update={"steps": 2}),
                                    evaluation=evaluation)
    pretrain_runs, evaluation_runs = len(flow_runs("pretrain/test")), len(flow_runs("dreambench_eval/test"))
    result = blip_diffusion_pipeline(parameters)
    assert result["pairs"]["pairs"] == 3 and result["latents"]["encoded"] + result["latents"]["cached"] == 3
    assert result["pretrain"]["step"] == 2
    assert result["pretrain"]["checkpoint"] == str(served.folder / "runs" / "pipeline-data" / "checkpoints"
                                                   / "step-0000002")
    assert result["evaluation"]["checkpoint_step"] == 2
    [evaluated] = read_history(served.folder / "pipeline-evals")
    assert evaluated["checkpoint_step"] == 2
    # Its subflows' events are its own: the served chain started nothing for them (its 2nd checkpoint is a
    # K-th one, which the evaluation trigger would take but for the subflow label).
    time.sleep(10)
    assert len(flow_runs("pretrain/test")) == pretrain_runs
    assert len(flow_runs("dreambench_eval/test")) == evaluation_runs


def test_only_a_complete_new_checkpoint_is_announced_once(tmp_path, monkeypatch):
    """Without a server: a checkpoint still being written (its temporary folder) or already there when the
    run starts is never announced; a complete new one is, once, labelled for every K it is a multiple of."""
    import prefect.events

    from blipdiff.flows.events import CHECKPOINT_WRITTEN, EVERY_LABEL, CheckpointAnnouncer
    from blipdiff.infra.atomic import TEMP_PREFIX
    from blipdiff.tasks.pretrain.config import CHECKPOINTS, STATE_FILE, TRAINING_STATE, checkpoint_name

    emitted = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda event, **kwargs: emitted.append((event, kwargs)))

    def write(name: str, step: int) -> None:
        state = tmp_path / CHECKPOINTS / name / TRAINING_STATE
        state.mkdir(parents=True)
        (state / STATE_FILE).write_text(json.dumps({"step": step}))

    write(checkpoint_name(2), 2)
    announcer = CheckpointAnnouncer(tmp_path, checkpoint_every=2)
    write(TEMP_PREFIX + checkpoint_name(4), 4)
    announcer.poll()
    assert emitted == []
    write(checkpoint_name(8), 8)
    announcer.poll()
    announcer.poll()
    assert [event for event, _ in emitted] == [CHECKPOINT_WRITTEN]
    assert "/4/" in emitted[0][1]["resource"][EVERY_LABEL]
