"""The demo: the whole system on the bundled sample, with no download, run through the chain's triggers.

1. ``build_pairs`` on Open Images-style annotations of scikit-image's photos (the weight-free captioner and
   segmenter), catalogued in FiftyOne; the demo runs it as a user would, with the chain served
   (``served_chain.py``: its own Prefect server, `blipdiff serve --chain` in a subprocess, one local Ray);
2. ``pretrain``, started by the build's event: a few steps of a small, randomly initialised BLIP-Diffusion
   on those pairs, on Ray Train;
3. ``dreambench_eval``, started by each of its checkpoints: zero-shot, on a small benchmark in DreamBench's
   layout made from the bundled photos, with small random DINO and CLIP models, catalogued in FiftyOne.

Every weight is random: the images are noise and the scores mean nothing. What the demo shows is the chain
of flows, their triggers, artifacts, the history and the catalogs; the commands printed at the end run the
same flows with the released weights.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from blipdiff.infra.atomic import atomic_folder, write_json_atomic
from blipdiff.infra.demo.served_chain import chain_served, deployment_runs, flow_run, wait_for
from blipdiff.tasks.pretrain.config import checkpoint_step, checkpoints

RELEASED = """With the released weights (downloaded once from the Hugging Face hub) and DreamBench
(github.com/google/dreambooth, its dataset/ folder), the same flows run as:
  blipdiff pretrain --pairs DATA --init Salesforce/blipdiffusion --out runs/stage2 [--reset-from-sd runwayml/stable-diffusion-v1-5]
  blipdiff eval --model Salesforce/blipdiffusion --dreambench dreambooth/dataset --out evals/zero-shot
  blipdiff eval --model Salesforce/blipdiffusion --dreambench dreambooth/dataset --out evals/finetuned --mode finetuned
  blipdiff serve --eval-parameters nightly.json --eval-cron "0 2 * * *" --timezone Europe/Paris
  blipdiff serve --chain chain.json [--work-pool gpu]   (the chain: a build starts pretrain, its K-th checkpoints an evaluation)"""


def demo_models(folder: Path) -> dict[str, Path]:
    """The demo's small random BLIP-Diffusion, DINO and CLIP (made once). Not named ``random_models``: that is
    the submodule's name, and importing the submodule would put it in this function's place."""
    from blipdiff.infra.demo.random_models import save_tiny_blip_diffusion, save_tiny_clip, save_tiny_dino

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
    models = demo_models(out / "models")
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

    with chain_served(out, chain_file, log) as ui:
        before = {path.name for path in checkpoints(run)}
        log(f"\nbuild_pairs on the bundled sample; its event starts the rest (chain: {chain_file.resolve()})")
        pairs = build_pairs_flow(BuildPairsParameters(boxes=boxes, classes=classes, backgrounds=backgrounds, data=out,
                                                      from_dir=photos, dataset=dataset, replace_catalog=True))
        log(f"\n{pairs['pairs']} pairs -> {(out / 'pairs.parquet').resolve()}")
        log(f"subjects -> {(out / 'subjects').resolve()}; images -> {(out / 'images').resolve()}")
        log(f"FiftyOne dataset {dataset!r}: `blipdiff app --dataset {dataset}`, then open http://127.0.0.1:5151")
        log(f"\nRANDOM WEIGHTS: a small randomly initialised BLIP-Diffusion ({models['blip-diffusion']}) and random "
            "DINO and CLIP stand in for the released ones, so the images are noise and the scores mean nothing.")

        training = wait_for(lambda: [r for r in deployment_runs("pretrain/demo")
                                     if r.parameters["parameters"]["out"] == str(run)
                                     and r.created.timestamp() >= ui.started], "the pre-training the build started",
                            ui)[0]
        log(f"pretrain: flow run {training.name!r} started by the trigger, into {run}")
        training = wait_for(lambda: [r for r in [flow_run(training.id)] if r.state.is_final()], "the pre-training",
                            ui)[0]
        if not training.state.is_completed():
            raise RuntimeError(f"pretrain {training.name!r} ended {training.state.name}: {training.state.message}")
        written = [path for path in checkpoints(run) if path.name not in before]
        log(f"pretrain: step {checkpoint_step(checkpoints(run)[-1])}, {len(written)} new checkpoints -> "
            f"{run / 'checkpoints'}")
        if not written:
            log("the run had already finished: no new checkpoint, so the chain started no evaluation")
        wanted = {str(path.resolve()) for path in written}
        evaluations = wait_for(lambda: (found := [r for r in deployment_runs("dreambench_eval/demo")
                                                  if r.parameters["parameters"]["model"] in wanted])
                               and len(found) == len(wanted) and all(r.state.is_final() for r in found) and found,
                               "the evaluations the checkpoints started", ui) if wanted else []
    from blipdiff.tasks.evaluation.history import read_history

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
