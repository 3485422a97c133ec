"""The DreamBooth baseline of ``eval --method dreambooth``: a subject checkpoint trained per subject into
``RUN/dreambooth/<subject>/``, its time recorded beside it, and what the report must say of the comparison."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from blipdiff.infra.atomic import write_json_atomic
from blipdiff.tasks.evaluation.config import EvalConfig


def dreambooth_folder(out: Path, subject: str) -> Path:
    return out / "dreambooth" / subject


def timing_path(out: Path, subject: str) -> Path:
    return out / "dreambooth" / f"{subject}.timing.json"


def train_dreambooth(config: EvalConfig, subjects, log: Callable[[str], None]) -> None:
    """DreamBooth for every subject not yet trained, one after the other on the driver (each on Ray Train,
    with the whole GPU), before the generation actors start. The class images (cached in
    ``RUN/class-images``, shared by the subjects of a class) are made first and timed apart, so that each
    subject's fine-tuning wall time is its own."""
    from blipdiff.models.stable_diffusion import RECORD_FILE
    from blipdiff.tasks.dreambooth.class_images import ensure_class_images
    from blipdiff.tasks.dreambooth.config import DreamBoothConfig
    from blipdiff.tasks.dreambooth.train import run_dreambooth

    for subject in subjects:
        folder = dreambooth_folder(config.out, subject.name)
        if (folder / RECORD_FILE).is_file() and timing_path(config.out, subject.name).is_file():
            continue
        training = DreamBoothConfig(
            base=config.model, images=list(subject.photos), class_noun=subject.class_name, out=folder,
            identifier=config.identifier, steps=config.dreambooth_steps, lr=config.dreambooth_lr,
            prior_preservation=config.prior_preservation, num_class_images=config.num_class_images,
            resolution=config.resolution, class_images=config.out / "class-images")
        start = time.perf_counter()
        if training.prior_preservation:
            ensure_class_images(training, log)
        class_seconds = time.perf_counter() - start
        start = time.perf_counter()
        run_dreambooth(training, log=lambda message: None)
        wall = time.perf_counter() - start
        write_json_atomic({"finetune_steps": config.dreambooth_steps, "finetune_seconds": round(wall, 3),
                           "class_image_seconds": round(class_seconds, 3),
                           "subject_checkpoint": str(folder.relative_to(config.out))}, timing_path(config.out, subject.name))
        log(f"{subject.name}: DreamBooth {config.dreambooth_steps} steps in {wall:.1f} s")


def report_notes(config: EvalConfig) -> list[str]:
    """What the report must say of its comparison with the paper: DreamBooth's numbers in the paper are
    DreamBooth on Stable Diffusion, so a run on another base (a BLIP-Diffusion checkpoint, say) is not
    like for like."""
    if config.method != "dreambooth":
        return []
    from blipdiff.models.stable_diffusion import not_stable_diffusion_15

    reason = not_stable_diffusion_15(config.model)
    if reason is None:
        return []
    return [f"DreamBooth here was fine-tuned on {config.model}, which is not Stable Diffusion 1.5 ({reason}): the "
            "paper's DreamBooth numbers (DreamBooth on Stable Diffusion) are not a like-for-like comparison."]
