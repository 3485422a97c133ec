"""The demo: the whole system on the bundled sample, with no download.

1. ``build_pairs`` on Open Images-style annotations of scikit-image's photos (the weight-free captioner and
   segmenter), catalogued in FiftyOne;
2. ``pretrain``: a few steps of a small, randomly initialised BLIP-Diffusion on those pairs, on Ray Train;
3. ``dreambench_eval``: the run's newest checkpoint, zero-shot, on a small benchmark in DreamBench's layout
   made from the bundled photos, with small random DINO and CLIP models, catalogued in FiftyOne.

Every weight is random: the images are noise and the scores mean nothing. What the demo shows is the chain
of flows, their artifacts, the history and the catalogs; the commands printed at the end run the same
flows with the released weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from blipdiff.infra.atomic import atomic_folder, write_json_atomic
from blipdiff.models.training.pretrain import checkpoint_step, checkpoints

RELEASED = """With the released weights (downloaded once from the Hugging Face hub) and DreamBench
(github.com/google/dreambooth, its dataset/ folder), the same flows run as:
  blipdiff pretrain --pairs DATA --init Salesforce/blipdiffusion --out runs/stage2 [--reset-from-sd runwayml/stable-diffusion-v1-5]
  blipdiff eval --model Salesforce/blipdiffusion --dreambench dreambooth/dataset --out evals/zero-shot
  blipdiff eval --model Salesforce/blipdiffusion --dreambench dreambooth/dataset --out evals/finetuned --mode finetuned
  blipdiff serve --eval-parameters nightly.json --eval-cron "0 2 * * *" --timezone Europe/Paris
  blipdiff serve --chain chain.json [--work-pool gpu]   (the chain: a build starts pretrain, its K-th checkpoints an evaluation)"""


def random_models(folder: Path) -> dict[str, Path]:
    """The demo's small random BLIP-Diffusion, DINO and CLIP (made once)."""
    from blipdiff.models.random_models import save_tiny_blip_diffusion, save_tiny_clip, save_tiny_dino

    builders = {"blip-diffusion": save_tiny_blip_diffusion, "dino": save_tiny_dino, "clip": save_tiny_clip}
    models = {}
    for name, build in builders.items():
        target = folder / name
        if not target.is_dir():
            with atomic_folder(target) as staging:
                build(staging)
        models[name] = target.resolve()
    return models


def run_demo(out: Path, dataset: str, log: Callable[[str], None] = print) -> dict:
    """Build the pairs as a user would; everything after is started by the chain's triggers, in the runs of
    `blipdiff serve --chain` (a subprocess), and the demo only watches it."""
    from blipdiff.datasets.samples import demo_annotations, write_demo_dreambench, write_demo_photos
    from blipdiff.flows.build_pairs import BuildPairsParameters, build_pairs_flow
    from blipdiff.flows.chain import ChainConfig, CheckpointEvaluation, PretrainPlan

    boxes, classes = demo_annotations()
    photos, backgrounds = out / "sample" / "photos", out / "sample" / "backgrounds"
    photos.mkdir(parents=True, exist_ok=True)
    backgrounds.mkdir(parents=True, exist_ok=True)
    write_demo_photos(photos, backgrounds)
    models = random_models(out / "models")
    bench = write_demo_dreambench(out / "sample" / "dreambench")
    # Six steps, a checkpoint every three, each evaluated (K = 1): the first evaluation waits, in the UI,
    # for the GPU slot that the training holds.
    chain = ChainConfig(
        pretrain=PretrainPlan(init=str(models["blip-diffusion"]), out=out / "runs", steps=6, batch_size=2, lr=1e-4,
                              resolution=32, precision="fp32", gradient_checkpointing=False, checkpoint_every=3,
                              validate_every=6, validation_pairs=1, validation_steps=4, log_every=1),
        evaluation=CheckpointEvaluation(eval_root=out / "evals", dreambench=bench, prompts=3, images_per_prompt=2,
                                        steps=10, resolution=32, dino=str(models["dino"]), clip=str(models["clip"]),
                                        dataset=f"{dataset}-dreambench"),
        evaluate_every=1)
    chain_file = out / "chain.json"
    write_json_atomic(chain.model_dump(mode="json"), chain_file)
    run = chain.pretrain.run_folder(out)

    with _chain_served(out, chain_file, log) as ui:
        before = {path.name for path in checkpoints(run)}
        log(f"\nbuild_pairs on the bundled sample; its event starts the rest (chain: {chain_file.resolve()})")
        pairs = build_pairs_flow(BuildPairsParameters(boxes=boxes, classes=classes, backgrounds=backgrounds, data=out,
                                                      from_dir=photos, dataset=dataset, replace_catalog=True))
        log(f"\n{pairs['pairs']} pairs -> {(out / 'pairs.parquet').resolve()}")
        log(f"subjects -> {(out / 'subjects').resolve()}; images -> {(out / 'images').resolve()}")
        log(f"FiftyOne dataset {dataset!r}: `blipdiff app --dataset {dataset}`, then open http://127.0.0.1:5151")
        log(f"\nRANDOM WEIGHTS: a small randomly initialised BLIP-Diffusion ({models['blip-diffusion']}) and random "
            "DINO and CLIP stand in for the released ones, so the images are noise and the scores mean nothing.")

        training = _wait(lambda: [r for r in _runs("pretrain/demo") if r.parameters["parameters"]["out"] == str(run)
                                  and r.created.timestamp() >= ui.started], "the pre-training the build started", ui)[0]
        log(f"pretrain: flow run {training.name!r} started by the trigger, into {run}")
        training = _wait(lambda: [r for r in [_run(training.id)] if r.state.is_final()], "the pre-training", ui)[0]
        if not training.state.is_completed():
            raise RuntimeError(f"pretrain {training.name!r} ended {training.state.name}: {training.state.message}")
        written = [path for path in checkpoints(run) if path.name not in before]
        log(f"pretrain: step {checkpoint_step(checkpoints(run)[-1])}, {len(written)} new checkpoints -> "
            f"{run / 'checkpoints'}")
        if not written:
            log("the run had already finished: no new checkpoint, so the chain started no evaluation")
        wanted = {str(path.resolve()) for path in written}
        evaluations = _wait(lambda: (found := [r for r in _runs("dreambench_eval/demo")
                                               if r.parameters["parameters"]["model"] in wanted])
                            and len(found) == len(wanted) and all(r.state.is_final() for r in found) and found,
                            "the evaluations the checkpoints started", ui) if wanted else []
    from blipdiff.models.evaluation_history import read_history

    history = {row["run_id"]: row for row in read_history(out / "evals")} if wanted else {}
    for evaluation in sorted(evaluations, key=lambda r: r.parameters["parameters"]["model"]):
        rows = [row for row in history.values() if row["model"] == evaluation.parameters["parameters"]["model"]]
        if not evaluation.state.is_completed() or not rows:
            log(f"dreambench_eval {evaluation.name!r}: {evaluation.state.name}: {evaluation.state.message}")
            continue
        row = rows[-1]
        log(f"dreambench_eval {evaluation.name!r} (started by checkpoint step {row['checkpoint_step']}): {row['run_id']}: "
            f"DINO {row['dino']:.3f}, CLIP-I {row['clip_i']:.3f}, CLIP-T {row['clip_t']:.3f} (random weights: meaningless)")
    if evaluations:
        log(f"reports -> {(out / 'evals').resolve()}/<run>/report.md; history -> "
            f"{(out / 'evals' / 'history.parquet').resolve()}")
        log(f"FiftyOne dataset {dataset + '-dreambench'!r}: `blipdiff app --dataset {dataset}-dreambench`")
    log(f"\nWatch the chain in the Prefect UI: {ui.how}")
    log("  Runs: the build, the pretrain its event started, the evaluations its checkpoints started (each GPU stage "
        "waits, in its log, for a slot of the limit blipdiff-gpu);\n  Automations: the chain's triggers, each can "
        "be turned off there; Concurrency: the limit blipdiff-gpu.")
    log("\n" + RELEASED)
    return {"pairs": pairs, "pretrain": training, "evaluations": evaluations}


def _runs(deployment: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])))


def _run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


class _Served:
    """The chain being served: since when, and how to open its UI."""

    def __init__(self, process, how: str):
        self.process, self.how, self.started = process, how, time.time()


def _wait(found, what: str, served: _Served, timeout: float = 1800):
    """Poll ``found`` until it returns something; fail if the served chain stops first."""
    deadline = time.monotonic() + timeout
    while not (result := found()):
        if served.process.poll() is not None:
            raise RuntimeError(f"blipdiff serve stopped while waiting for {what}: see its log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(2)
    return result


@contextmanager
def _chain_served(out: Path, chain_file: Path, log: Callable[[str], None]):
    """A Prefect server (the demo's own, its state in OUT/prefect, unless PREFECT_API_URL names one), one
    local Ray that the runs join, and `blipdiff serve --chain` in a subprocess, all stopped at the end."""
    import os
    import signal
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from blipdiff.infra.ray_cluster import connect_ray

    server = None
    api = os.environ.get("PREFECT_API_URL")
    if api is None:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start(timeout=300)
        api = server.api_url
        how = f"`blipdiff server --data {out}`, then open http://127.0.0.1:4200/runs"
    else:
        how = f"{api.removesuffix('/api')}/runs"
    import ray

    connect_ray()
    environment = {**os.environ, "PREFECT_API_URL": api, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    serve_log = out / "serve.log"
    with open(serve_log, "ab") as sink, temporary_settings({PREFECT_API_URL: api}):
        process = subprocess.Popen([sys.executable, "-m", "blipdiff.infra.cli", "serve", "--data", str(out),
                                    "--name", "demo", "--chain", str(chain_file)],
                                   env=environment, stdout=sink, stderr=sink, preexec_fn=_own_group_ending_with_parent)
        log(f"blipdiff serve --chain {chain_file} (pid {process.pid}; its log: {serve_log.resolve()})")
        served = _Served(process, how)
        try:
            _wait(lambda: _deployed("build_pairs/demo", "pretrain/demo", "dreambench_eval/demo"),
                  "the served deployments", served, timeout=600)
            served.started = time.time()
            yield served
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=120)
            if server is not None:
                server.stop()


def _own_group_ending_with_parent() -> None:
    """In the child before it runs: a process group of its own (so the end stops its runs too), and a SIGTERM
    when the demo dies, even by SIGKILL, so no served chain outlives it."""
    import ctypes
    import os
    import signal

    os.setsid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _deployed(*names: str) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            for name in names:
                client.read_deployment_by_name(name)
        except Exception:
            return False
    return True
