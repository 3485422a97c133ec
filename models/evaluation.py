"""``blipdiff eval``: a model on DreamBench by the paper's protocol: generate, score, report (and catalogue).

Per subject, per prompt (DreamBench's first ``prompts`` of its list), ``images_per_prompt`` images, PNDM,
``steps`` steps, guidance ``guidance``, ``resolution``². The text encoder gets each prompt in the form the
authors' evaluation gave it ("a dog in the jungle, in the jungle, ..."; property prompts "a red backpack,
a red backpack, ...": ``datasets.dreambench`` says why), and DreamBooth DreamBench's own prompt ("a red sks
backpack"); ``generations.parquet`` records that exact text (``text_encoder_prompt``). CLIP-T compares
each image with the DreamBench text without its identifier. Zero-shot, the subject embedding is the mean
over the subject's photos (``reference="all"``), its first photo (``"first"``), or the photo a FILE names
(an image, for one subject; or a CSV of ``subject,photo`` lines). Fine-tuned, ``blipdiff finetune`` runs per subject with the paper's step
counts (appendix Table 3) into ``RUN/finetuned/<subject>/``, and the subject checkpoint generates.

Image k of prompt p of subject s in seed set n is drawn with the seed derived from (n, s, p, k), so any
image can be made again alone, and ``seed_sets`` repeats the benchmark with other seeds: the report gives
the mean over seed sets and their spread.

Layout of RUN: ``eval.json`` (the settings; a rerun with others is refused), ``images/seed-set-<n>/<subject>/
<pp>_<k>.png`` (each folder scoreable by ``blipdiff score --images``), ``journal/<seed set>-<subject>.jsonl``
(one line per finished image, written by the one worker that owns the subject), ``generations.parquet``,
``scores.parquet``, ``summary.json``, ``report.md`` and ``per_subject.png``. Each image is written
atomically and journaled: a rerun, after a crash too, makes only the images not yet journaled.

Generation fans out over Ray actors (one model each, subjects dealt round-robin); the metric models run
in an actor of their own, scoring each subject as soon as its images are done. On a cluster with GPUs a
generation actor takes 0.8 of a GPU and the metric actor 0.2, so the metric models share the first GPU
instead of waiting for one of their own.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from blipdiff.infra.atomic import atomic_path, remove_stale_temporaries, write_json_atomic
from blipdiff.infra.journal import Journal
from blipdiff.models import DEFAULT_CLIP, DEFAULT_DINO
from blipdiff.models.devices import DTYPE_HELP, DType, resolve_device, torch_dtype
from blipdiff.infra.inputs import Identifier, ImageSide, model_location, readable_image
from blipdiff.models.scoring import METRICS, summarize

SETTINGS_FILE = "eval.json"
GENERATIONS = "generations.parquet"
SCORES = "scores.parquet"
SUMMARY = "summary.json"
GPU_SHARE_GENERATION, GPU_SHARE_METRICS = 0.8, 0.2


class EvalSettings(BaseModel):
    """What a DreamBench evaluation runs, besides the model and the run folder: shared by ``blipdiff eval``
    and the ``dreambench_eval`` flow's form."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dreambench: Path = Field(description="DreamBench's dataset folder (DreamBooth's layout).")
    method: Literal["blip-diffusion", "dreambooth"] = Field(
        "blip-diffusion", description="dreambooth: DreamBooth fine-tuned per subject on the model as its base.")
    mode: Literal["zero-shot", "finetuned"] = Field("zero-shot", description="Zero-shot, or fine-tuned per subject.")
    subjects: list[str] = Field(default_factory=list, description="Subjects to evaluate (empty: all of them).")
    prompts: int = Field(25, ge=1, le=25, description="The first N prompts of each subject's list.")
    images_per_prompt: int = Field(4, ge=1)
    steps: int = Field(100, ge=1, description="PNDM steps (the paper: 100).")
    guidance: float = Field(7.5, ge=0)
    seed_sets: int = Field(1, ge=1, description="Repeats with other seeds (the paper: 10).")
    reference: str = Field("all", description="all, first, or FILE (a photo, or a CSV of subject,photo).")
    resolution: ImageSide = 512
    negative_prompt: str = ""
    finetune_steps: int | None = Field(None, ge=1, description="Fine-tuning steps for every subject "
                                       "(default: the paper's Table 3 per subject).")
    finetune_mode: Literal["full", "lora"] = "full"
    finetune_precision: Literal["bf16", "fp32"] = "bf16"
    dreambooth_steps: int = Field(800, ge=1, description="DreamBooth's steps per subject.")
    dreambooth_lr: float = Field(5e-6, gt=0)
    prior_preservation: bool = Field(True, description="DreamBooth's class-specific prior-preservation loss.")
    num_class_images: int = Field(200, ge=1)
    identifier: Identifier = Field("sks", description="DreamBooth's identifier in the prompts.")
    dtype: DType = Field("auto", description=f"Generation dtype: {DTYPE_HELP}")
    dino: str = Field(DEFAULT_DINO, description="DINO ViT-S/16: hub id or folder.")
    clip: str = Field(DEFAULT_CLIP, description="CLIP ViT-B/32: hub id or folder.")
    dataset: str | None = Field("dreambench", description="FiftyOne dataset of the catalog (empty: no catalog).")
    actors: int = Field(1, ge=1, description="Generation actors (one model each; one per GPU, say).")

    @field_validator("subjects")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        names = [name.strip() for name in value if name.strip()]
        if len(set(names)) != len(names):
            raise ValueError("a subject is named twice")
        return names

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return value.strip()

    @property
    def report_mode(self) -> str:
        """Which of the paper's numbers the run stands beside: zero-shot, finetuned or dreambooth."""
        return "dreambooth" if self.method == "dreambooth" else self.mode

    def protocol(self) -> dict:
        """What makes two evaluations comparable (the history's fingerprint): everything but the model,
        the catalog and the fan-out."""
        from blipdiff.datasets.dreambench import PROMPT_FORM

        protocol = self.model_dump(mode="json", include=set(EvalSettings.model_fields) - {"dataset", "actors"})
        protocol["dreambench"] = str(self.dreambench.resolve())
        # Runs whose text encoder got other texts made other images: neither comparable nor resumable.
        protocol["prompt_form"] = PROMPT_FORM
        return protocol


class EvalConfig(EvalSettings):
    """One ``blipdiff eval`` run."""

    model: str = Field(description="Hub id or local checkpoint folder in the official layout.")
    out: Path = Field(description="The run folder.")
    checkpoint_step: int | None = Field(None, description="The training step of the model, when known.")

    @property
    def run_id(self) -> str:
        return self.out.resolve().name

    def settings(self) -> dict:
        """What decides the images and scores of the run folder."""
        return {**self.protocol(), "model": model_location(self.model)}


def image_seed(seed_set: int, subject: str, prompt_index: int, image_index: int) -> int:
    """A seed of its own for every image, the same in every run and on every machine."""
    key = f"dreambench/{seed_set}/{subject}/{prompt_index}/{image_index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") >> 1


def image_path(seed_set: int, subject: str, prompt_index: int, image_index: int) -> str:
    return f"images/seed-set-{seed_set}/{subject}/{prompt_index:02d}_{image_index}.png"


def reference_photos(settings: EvalSettings, subject) -> list[Path]:
    """The photos whose mean is the zero-shot subject embedding."""
    if settings.reference == "all":
        return list(subject.photos)
    if settings.reference == "first":
        return [subject.photos[0]]
    path = Path(settings.reference)
    if path.suffix.lower() in (".csv", ".txt"):
        chosen = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            name, _, photo = line.strip().partition(",")
            if name and photo:
                chosen[name.strip()] = photo.strip()
        if subject.name not in chosen:
            raise ValueError(f"--reference {path}: no photo for {subject.name}")
        photo = Path(chosen[subject.name])
        return [photo if photo.is_absolute() else subject.photos[0].parent / photo]
    return [path]


def plan(config: EvalConfig):
    """The benchmark, the subjects and every image to make, after every input has been checked."""
    from blipdiff.datasets.dreambench import FINETUNE_STEPS, read_dreambench
    from blipdiff.models.blip_diffusion import checkpoint

    # On the driver first: a wrong model is a one-line error, and a hub id is fetched once for every actor.
    if config.method == "dreambooth":
        from blipdiff.models.dreambooth import resolve_base

        resolve_base(config.model)
    else:
        checkpoint.resolve(config.model)
    bench = read_dreambench(config.dreambench)
    subjects = [bench.subject(name) for name in config.subjects] if config.subjects else list(bench.subjects)
    if config.reference not in ("all", "first"):
        path = Path(config.reference)
        if not path.is_file():
            raise ValueError(f"--reference {path}: not all, first, or an existing file")
        if path.suffix.lower() not in (".csv", ".txt") and len(subjects) != 1:
            raise ValueError(f"--reference {path}: one photo serves one subject; name it with --subjects, or give a "
                             "CSV of subject,photo lines")
        for subject in subjects:
            for photo in reference_photos(config, subject):
                readable_image(photo)
    if config.method == "blip-diffusion" and config.mode == "finetuned" and config.finetune_steps is None:
        unknown = [subject.name for subject in subjects if subject.name not in FINETUNE_STEPS]
        if unknown:
            raise ValueError(f"the paper's Table 3 has no fine-tuning steps for {', '.join(unknown)}: "
                             "give --finetune-steps")
    jobs = []
    for subject in subjects:
        for prompt in bench.prompts(subject)[:config.prompts]:
            for seed_set in range(config.seed_sets):
                for image_index in range(config.images_per_prompt):
                    jobs.append({"seed_set": seed_set, "subject": subject.name, "class": subject.class_name,
                                 "live": subject.live, "prompt_index": prompt.index, "prompt": prompt.text,
                                 "kind": prompt.kind, "image_index": image_index,
                                 "text_encoder_prompt": prompt.dreambooth_text(config.identifier)
                                 if config.method == "dreambooth" else prompt.blip_diffusion_text,
                                 "seed": image_seed(seed_set, subject.name, prompt.index, image_index),
                                 "path": image_path(seed_set, subject.name, prompt.index, image_index)})
    return bench, subjects, jobs


def check_run_folder(config: EvalConfig) -> None:
    """A run folder holds one run: a rerun with other settings is refused, so outputs never mix."""
    settings_file = config.out / SETTINGS_FILE
    if settings_file.is_file():
        recorded = json.loads(settings_file.read_text())
        if recorded != config.settings():
            changed = sorted(key for key in set(recorded) | set(config.settings())
                             if recorded.get(key) != config.settings().get(key))
            raise ValueError(f"{config.out} holds an evaluation with other settings ({', '.join(changed)}); "
                             "choose another --out")
    elif config.out.is_dir() and any(config.out.iterdir()):
        raise ValueError(f"{config.out} is not empty and holds no evaluation; choose another --out")


def journal_path(out: Path, seed_set: int, subject: str) -> Path:
    return out / "journal" / f"{seed_set}-{subject}.jsonl"


def finished(out: Path, jobs: list[dict]) -> set[str]:
    """The images journaled and still on disk."""
    done = set()
    for seed_set, subject in {(job["seed_set"], job["subject"]) for job in jobs}:
        for entry in Journal(journal_path(out, seed_set, subject)).load():
            if (out / entry["path"]).is_file():
                done.add(entry["path"])
    return done


class SubjectGenerator:
    """One generation worker (a Ray actor): the model loaded once; given a subject and its missing images,
    it makes, writes and journals them one by one."""

    def __init__(self, config: EvalConfig):
        self.config = config
        self.device = resolve_device()
        self.dtype = torch_dtype(config.dtype, self.device)
        self.pipe = None if config.mode == "finetuned" or config.method == "dreambooth" else self._load()

    def _load(self):
        import diffusers

        from blipdiff.models.blip_diffusion import BlipDiffusionPipeline

        pipe = BlipDiffusionPipeline.from_pretrained(self.config.model, torch_dtype=self.dtype, device=self.device)
        pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _finetuned(self, subject) -> tuple[object, object, dict]:
        """A fresh pipeline with the subject's checkpoint applied (fine-tuned first when missing)."""
        from blipdiff.datasets.dreambench import FINETUNE_STEPS
        from blipdiff.models.blip_diffusion.subject_checkpoint import read_record
        from blipdiff.models.training.finetune import FinetuneConfig, finetune

        config = self.config
        folder = config.out / "finetuned" / subject.name
        steps = config.finetune_steps or FINETUNE_STEPS[subject.name]
        finetune(FinetuneConfig(model=config.model, images=list(subject.photos), subject=subject.class_name,
                                out=folder, steps=steps, mode=config.finetune_mode,
                                precision=config.finetune_precision, resolution=config.resolution),
                 log=lambda message: None)
        pipe = self._load()
        embeds = pipe.load_subject(folder)
        record = read_record(folder)
        return pipe, embeds, {"finetune_steps": steps, "finetune_seconds": sum(record.get("seconds", {}).values()),
                              "subject_checkpoint": str(folder.relative_to(config.out))}

    def generate(self, subject, jobs: list[dict]) -> dict:
        """Make the subject's missing images; the per-subject facts (fine-tuning steps and time) back."""
        import torch
        from PIL import Image

        config = self.config
        facts: dict = {}
        if config.method == "dreambooth":
            import diffusers

            from blipdiff.models.dreambooth import load_dreambooth

            pipe = load_dreambooth(config.model, dreambooth_folder(config.out, subject.name), self.dtype, self.device)
            pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config)
            for job in jobs:
                start = time.perf_counter()
                image = pipe(job["text_encoder_prompt"], negative_prompt=config.negative_prompt,
                             guidance_scale=config.guidance, height=config.resolution, width=config.resolution,
                             num_inference_steps=config.steps,
                             generator=torch.Generator("cpu").manual_seed(job["seed"])).images[0]
                self._keep(subject, job, image, start)
            return facts
        if config.mode == "finetuned":
            pipe, embeds, facts = self._finetuned(subject)
        else:
            pipe = self.pipe
            photos = []
            for path in reference_photos(config, subject):
                with Image.open(path) as photo:
                    photos.append(photo.convert("RGB"))
            embeds = pipe.subject_embedding(photos, subject.class_name)
        for job in jobs:
            start = time.perf_counter()
            image = pipe(job["text_encoder_prompt"], raw_prompt=True, subject_embeds=embeds,
                         guidance_scale=config.guidance, height=config.resolution, width=config.resolution,
                         num_inference_steps=config.steps, neg_prompt=config.negative_prompt,
                         generator=torch.Generator("cpu").manual_seed(job["seed"])).images[0]
            self._keep(subject, job, image, start)
        return facts

    def _keep(self, subject, job: dict, image, start: float) -> None:
        """Write the image atomically, then journal it."""
        with atomic_path(self.config.out / job["path"]) as partial:
            image.save(partial, format="PNG")
        Journal(journal_path(self.config.out, job["seed_set"], subject.name)).append(
            {"path": job["path"], "seed": job["seed"], "seconds": round(time.perf_counter() - start, 4)})


class SubjectScorer:
    """The metric models (a Ray actor), loaded once; scores a subject's images against its real photos."""

    def __init__(self, dino: str, clip: str, out: Path):
        from blipdiff.models.metrics import ClipEmbedder, DinoEmbedder

        device = resolve_device()
        self.dino, self.clip, self.out = DinoEmbedder(dino, device), ClipEmbedder(clip, device), out

    def score(self, bench, jobs: list[dict]) -> list[dict]:
        from blipdiff.models.scoring import score_images

        scored = []
        for seed_set in sorted({job["seed_set"] for job in jobs}):
            mine = {str((self.out / job["path"]).resolve()): job for job in jobs if job["seed_set"] == seed_set}
            rows = [{**job, "path": Path(path)} for path, job in mine.items()]
            for row in score_images(rows, bench, self.dino, self.clip, log=lambda message: None):
                job = mine[row["path"]]
                scored.append({**row, "seed_set": seed_set, "path": job["path"]})
        return scored


def _resources(actors: int) -> tuple[dict, dict]:
    """Each generation actor's and the metric actor's share of the cluster; a cluster too small to hold them
    all at once is an error (the metric actor would wait for ever behind the generators)."""
    import ray

    from blipdiff.infra.ray_cluster import cluster_has_gpus

    resources = ray.cluster_resources()
    if cluster_has_gpus():
        if resources["GPU"] < actors:
            raise ValueError(f"--actors {actors}: the Ray cluster has {resources['GPU']:g} GPUs, one per actor is needed")
        return {"num_gpus": GPU_SHARE_GENERATION, "num_cpus": 1}, {"num_gpus": GPU_SHARE_METRICS, "num_cpus": 1}
    if resources.get("CPU", 0) < actors + 1:
        raise ValueError(f"--actors {actors}: the Ray cluster has {resources.get('CPU', 0):g} CPUs, and the "
                         f"generation actors and the metric actor need {actors + 1}")
    return {"num_cpus": 1}, {"num_cpus": 1}


def _generate_and_score(config: EvalConfig, bench, subjects, jobs: list[dict], done: set[str],
                        log: Callable[[str], None], progress: Callable[[int, int], None] | None) -> tuple[list, dict]:
    """Every subject's missing images on the generation actors, each subject scored once its images exist."""
    import ray

    from blipdiff.infra.ray_cluster import connect_ray

    connect_ray()
    pending_subjects = [s for s in subjects if any(j["subject"] == s.name and j["path"] not in done for j in jobs)]
    actors = min(config.actors, len(pending_subjects))
    generation, metrics = _resources(actors)
    scorer = ray.remote(SubjectScorer).options(**metrics).remote(config.dino, config.clip, config.out)
    generators = [ray.remote(SubjectGenerator).options(**generation).remote(config) for _ in range(actors)]
    by_subject = {s.name: [j for j in jobs if j["subject"] == s.name] for s in subjects}
    generating = {}
    scoring = []
    facts: dict[str, dict] = {}
    try:
        for index, subject in enumerate(subjects):
            if subject in pending_subjects:
                missing = [job for job in by_subject[subject.name] if job["path"] not in done]
                generating[generators[index % len(generators)].generate.remote(subject, missing)] = subject
            else:
                scoring.append(scorer.score.remote(bench, by_subject[subject.name]))
        finished_subjects = len(subjects) - len(pending_subjects)
        if progress is not None:
            progress(finished_subjects, len(subjects))
        while generating:
            ready, _ = ray.wait(list(generating), num_returns=1)
            subject = generating.pop(ready[0])
            facts[subject.name] = ray.get(ready[0])
            scoring.append(scorer.score.remote(bench, by_subject[subject.name]))
            finished_subjects += 1
            log(f"{subject.name}: {sum(j['path'] not in done for j in by_subject[subject.name])} images made")
            if progress is not None:
                progress(finished_subjects, len(subjects))
        scores = [row for rows in ray.get(scoring) for row in rows]
    except ray.exceptions.RayTaskError as error:
        # The worker's own exception (a refused input, a missing file), not Ray's wrapper of it.
        raise error.cause from None
    finally:
        for actor in (*generators, scorer):
            ray.kill(actor)
    return scores, facts


def dreambooth_folder(out: Path, subject: str) -> Path:
    return out / "dreambooth" / subject


def _timing_path(out: Path, subject: str) -> Path:
    return out / "dreambooth" / f"{subject}.timing.json"


def train_dreambooth(config: EvalConfig, subjects, log: Callable[[str], None]) -> None:
    """DreamBooth for every subject not yet trained, one after the other on the driver (each on Ray Train,
    with the whole GPU), before the generation actors start. The class images (cached in
    ``RUN/class-images``, shared by the subjects of a class) are made first and timed apart, so that each
    subject's fine-tuning wall time is its own."""
    from blipdiff.models.dreambooth import RECORD_FILE
    from blipdiff.models.training.dreambooth import DreamBoothConfig, ensure_class_images, run_dreambooth

    for subject in subjects:
        folder = dreambooth_folder(config.out, subject.name)
        if (folder / RECORD_FILE).is_file() and _timing_path(config.out, subject.name).is_file():
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
                           "subject_checkpoint": str(folder.relative_to(config.out))}, _timing_path(config.out, subject.name))
        log(f"{subject.name}: DreamBooth {config.dreambooth_steps} steps in {wall:.1f} s")


def report_notes(config: EvalConfig) -> list[str]:
    """What the report must say of its comparison with the paper: DreamBooth's numbers in the paper are
    DreamBooth on Stable Diffusion, so a run on another base (a BLIP-Diffusion checkpoint, say) is not
    like for like."""
    if config.method != "dreambooth":
        return []
    from blipdiff.models.dreambooth import not_stable_diffusion_15

    reason = not_stable_diffusion_15(config.model)
    if reason is None:
        return []
    return [f"DreamBooth here was fine-tuned on {config.model}, which is not Stable Diffusion 1.5 ({reason}): the "
            "paper's DreamBooth numbers (DreamBooth on Stable Diffusion) are not a like-for-like comparison."]


def _seed_set_spread(scores: list[dict]) -> dict:
    """The benchmark's means per seed set, and their mean and (sample) standard deviation."""
    import numpy as np

    sets = sorted({row["seed_set"] for row in scores})
    per_set = {str(s): summarize([row for row in scores if row["seed_set"] == s])["mean_over_subjects"] for s in sets}
    spread = {}
    for metric in METRICS:
        values = np.array([per_set[str(s)][metric] for s in sets])
        spread[metric] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None}
    return {"per_seed_set": per_set, "spread": spread}


def _subject_facts(out: Path, subjects, facts: dict) -> dict:
    """Per subject, its fine-tuning facts: from this run's workers, else from the checkpoint on disk."""
    from blipdiff.models.blip_diffusion.subject_checkpoint import SUBJECT_FILE

    known = {}
    for subject in subjects:
        if subject.name in facts and facts[subject.name]:
            known[subject.name] = facts[subject.name]
        elif _timing_path(out, subject.name).is_file():
            known[subject.name] = json.loads(_timing_path(out, subject.name).read_text())
        elif (out / "finetuned" / subject.name / SUBJECT_FILE).is_file():
            record = json.loads((out / "finetuned" / subject.name / SUBJECT_FILE).read_text())
            known[subject.name] = {"finetune_steps": record["settings"]["steps"],
                                   "finetune_seconds": sum(record.get("seconds", {}).values()),
                                   "subject_checkpoint": f"finetuned/{subject.name}"}
    return known


def run_eval(config: EvalConfig, log: Callable[[str], None] = print,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Generate what is missing, score everything, write the outputs and the report (and the catalog);
    return the summary."""
    import pandas as pd

    from blipdiff.models.evaluation_report import write_report

    bench, subjects, jobs = plan(config)
    check_run_folder(config)
    (config.out / "journal").mkdir(parents=True, exist_ok=True)
    write_json_atomic(config.settings(), config.out / SETTINGS_FILE)
    for folder in {(config.out / job["path"]).parent for job in jobs}:
        remove_stale_temporaries(folder)
    done = finished(config.out, jobs)
    log(f"{len(jobs)} images of {len(subjects)} subjects: {len(done)} already made, {len(jobs) - len(done)} to make")
    if config.method == "dreambooth":
        train_dreambooth(config, subjects, log)
    started = time.perf_counter()
    scores, facts = _generate_and_score(config, bench, subjects, jobs, done, log, progress)
    seconds = time.perf_counter() - started
    facts = _subject_facts(config.out, subjects, facts)

    settings = config.settings()
    # To the millisecond: history orders runs by it, and two runs of a small benchmark can end in one second.
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    versions = json.dumps({name: version(name) for name in ("blipdiff", "torch", "diffusers", "transformers")})
    generations = pd.DataFrame([{**job, **facts.get(job["subject"], {})} for job in jobs])
    generations = generations.assign(
        run_id=config.run_id, model=settings["model"], checkpoint_step=config.checkpoint_step,
        mode=config.report_mode, method=config.method,
        steps=config.steps, guidance=config.guidance, resolution=config.resolution, reference=config.reference,
        negative_prompt=config.negative_prompt, dtype=config.dtype, settings=json.dumps(settings), versions=versions,
        created=created)
    with atomic_path(config.out / GENERATIONS) as temp:
        generations.to_parquet(temp, index=False)
    columns = ["subject", "class", "seed_set", "prompt_index", "image_index", "prompt", "kind", "path", *METRICS]
    scores = sorted(scores, key=lambda row: (row["subject"], row["seed_set"], row["prompt_index"], row["image_index"]))
    with atomic_path(config.out / SCORES) as temp:
        pd.DataFrame(scores)[columns].to_parquet(temp, index=False)

    summary = {"run_id": config.run_id, "model": settings["model"], "checkpoint_step": config.checkpoint_step,
               "mode": config.report_mode, "method": config.method, "created": created, **summarize(scores),
               **_seed_set_spread(scores),
               "seconds": round(seconds, 2), "images_made": len(jobs) - len(done),
               "finetuning": {name: values for name, values in facts.items()}, "settings": settings}
    write_json_atomic(summary, config.out / SUMMARY)
    write_report(scores, config.report_mode, config.out, f"DreamBench, {config.report_mode}: {config.run_id}",
                 spread=summary["spread"], notes=report_notes(config))
    if config.dataset is not None:
        from blipdiff.datasets.dreambench_catalog import catalog_evaluation

        summary["catalog"] = catalog_evaluation(config.out, config.dataset).as_dict()
        write_json_atomic(summary, config.out / SUMMARY)
    log(f"scores -> {config.out / SCORES}; report -> {config.out / 'report.md'}")
    return summary
