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

from collections.abc import Callable
from pathlib import Path

from blipdiff.infra.atomic import atomic_folder

RELEASED = """With the released weights (downloaded once from the Hugging Face hub) and DreamBench
(github.com/google/dreambooth, its dataset/ folder), the same flows run as:
  blipdiff pretrain --pairs DATA --init Salesforce/blipdiffusion --out runs/stage2 [--reset-from-sd runwayml/stable-diffusion-v1-5]
  blipdiff eval --model Salesforce/blipdiffusion --dreambench dreambooth/dataset --out evals/zero-shot
  blipdiff eval --model Salesforce/blipdiffusion --dreambench dreambooth/dataset --out evals/finetuned --mode finetuned
  blipdiff serve --eval-parameters nightly.json --eval-cron "0 2 * * *" --timezone Europe/Paris"""


def random_models(folder: Path) -> dict[str, Path]:
    """The demo's small random BLIP-Diffusion, DINO and CLIP (made once)."""
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
    from blipdiff.datasets.samples import demo_annotations, write_demo_dreambench, write_demo_photos
    from blipdiff.flows.build_pairs import BuildPairsParameters, build_pairs_flow
    from blipdiff.flows.dreambench_eval import DreamBenchEvalParameters, dreambench_eval_flow
    from blipdiff.flows.pretrain import pretrain_flow
    from blipdiff.tasks.pretrain.config import PretrainConfig

    boxes, classes = demo_annotations()
    photos, backgrounds = out / "sample" / "photos", out / "sample" / "backgrounds"
    photos.mkdir(parents=True, exist_ok=True)
    backgrounds.mkdir(parents=True, exist_ok=True)
    write_demo_photos(photos, backgrounds)
    pairs = build_pairs_flow(BuildPairsParameters(boxes=boxes, classes=classes, backgrounds=backgrounds, data=out,
                                                  from_dir=photos, dataset=dataset, replace_catalog=True))
    log(f"\n{pairs['pairs']} pairs -> {(out / 'pairs.parquet').resolve()}")
    log(f"subjects -> {(out / 'subjects').resolve()}; images -> {(out / 'images').resolve()}")
    log(f"FiftyOne dataset {dataset!r}: `blipdiff app --dataset {dataset}`, then open http://127.0.0.1:5151")

    models = random_models(out / "models")
    log(f"\nRANDOM WEIGHTS: a small randomly initialised BLIP-Diffusion ({models['blip-diffusion']}) and random "
        "DINO and CLIP stand in for the released ones, so the images are noise and the scores mean nothing.")
    training = pretrain_flow(PretrainConfig(
        pairs=[out], init=str(models["blip-diffusion"]), out=out / "pretrain", steps=6, batch_size=2, lr=1e-4,
        resolution=32, precision="fp32", gradient_checkpointing=False, checkpoint_every=3, validate_every=6,
        validation_pairs=1, validation_steps=4, log_every=1))
    log(f"pretrain: step {training['step']}, checkpoint -> {training['checkpoint']}")

    bench = write_demo_dreambench(out / "sample" / "dreambench")
    evaluation = dreambench_eval_flow(DreamBenchEvalParameters(
        training_run=out / "pretrain", eval_root=out / "evals", dreambench=bench, prompts=3, images_per_prompt=2,
        steps=10, resolution=32, dino=str(models["dino"]), clip=str(models["clip"]), dataset=f"{dataset}-dreambench"))
    log(f"dreambench_eval: {evaluation['run_id']}: DINO {evaluation['dino']:.3f}, CLIP-I {evaluation['clip_i']:.3f}, "
        f"CLIP-T {evaluation['clip_t']:.3f} (random weights: meaningless)")
    log(f"report -> {Path(evaluation['run_folder']).resolve() / 'report.md'}; history -> "
        f"{(out / 'evals' / 'history.parquet').resolve()}")
    log(f"FiftyOne dataset {dataset + '-dreambench'!r}: `blipdiff app --dataset {dataset}-dreambench`")
    log("\n" + RELEASED)
    return {"pairs": pairs, "pretrain": training, "evaluation": evaluation}
