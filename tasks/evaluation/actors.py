"""The evaluation's Ray actors: generation workers (one model each, subjects dealt round-robin) and the
metric actor, which scores each subject as soon as its images are done. On a cluster with GPUs a
generation actor takes 0.8 of a GPU and the metric actor 0.2, so the metric models share the first GPU
instead of waiting for one of their own."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from blipdiff.infra.atomic import atomic_path
from blipdiff.infra.journal import Journal
from blipdiff.models.devices import resolve_device, torch_dtype
from blipdiff.tasks.evaluation.baseline import dreambooth_folder
from blipdiff.tasks.evaluation.config import EvalConfig, EvalJob, journal_path, reference_photos
from blipdiff.tasks.sampling import load_blip_diffusion, render

GPU_SHARE_GENERATION, GPU_SHARE_METRICS = 0.8, 0.2
PROTOCOL_SCHEDULER = "pndm"  # the paper's


def _generator(seed: int):
    import torch

    return torch.Generator("cpu").manual_seed(seed)


class SubjectGenerator:
    """One generation worker (a Ray actor): the model loaded once; given a subject and its missing images,
    it makes, writes and journals them one by one."""

    def __init__(self, config: EvalConfig):
        self.config = config
        self.device = resolve_device()
        self.dtype = torch_dtype(config.dtype, self.device)
        self.pipe = None if config.mode == "finetuned" or config.method == "dreambooth" else self._load()

    def _load(self):
        return load_blip_diffusion(self.config.model, self.dtype, self.device, scheduler=PROTOCOL_SCHEDULER)

    def _finetuned(self, subject) -> tuple[object, object, dict]:
        """A fresh pipeline with the subject's checkpoint applied (fine-tuned first when missing)."""
        from blipdiff.datasets.dreambench import FINETUNE_STEPS
        from blipdiff.models.blip_diffusion.subject_checkpoint import read_subject_record
        from blipdiff.tasks.finetune import FinetuneConfig, finetune

        config = self.config
        folder = config.out / "finetuned" / subject.name
        steps = config.finetune_steps or FINETUNE_STEPS[subject.name]
        finetune(FinetuneConfig(model=config.model, images=list(subject.photos), subject=subject.class_name,
                                out=folder, steps=steps, mode=config.finetune_mode,
                                precision=config.finetune_precision, resolution=config.resolution),
                 log=lambda message: None)
        pipe = self._load()
        embeds = pipe.load_subject(folder)
        record = read_subject_record(folder)
        return pipe, embeds, {"finetune_steps": steps, "finetune_seconds": sum(record.get("seconds", {}).values()),
                              "subject_checkpoint": str(folder.relative_to(config.out))}

    def generate(self, subject, jobs: list[EvalJob]) -> dict:
        """Make the subject's missing images; the per-subject facts (fine-tuning steps and time) back."""
        from PIL import Image

        config = self.config
        facts: dict = {}
        if config.method == "dreambooth":
            from blipdiff.models.sampling import set_scheduler
            from blipdiff.models.stable_diffusion import load_dreambooth

            pipe = load_dreambooth(config.model, dreambooth_folder(config.out, subject.name), self.dtype, self.device)
            set_scheduler(pipe, PROTOCOL_SCHEDULER)
            conditioning = {}
        else:
            if config.mode == "finetuned":
                pipe, embeds, facts = self._finetuned(subject)
            else:
                pipe = self.pipe
                photos = []
                for path in reference_photos(config, subject):
                    with Image.open(path) as photo:
                        photos.append(photo.convert("RGB"))
                embeds = pipe.subject_embedding(photos, subject.class_name)
            # DreamBench's texts go to the text encoder as they are, already in the authors' form.
            conditioning = {"raw_prompt": True, "subject_embeds": embeds}
        for job in jobs:
            start = time.perf_counter()
            image = render(pipe, job.text_encoder_prompt, method=config.method, steps=config.steps,
                           guidance=config.guidance, height=config.resolution, width=config.resolution,
                           negative_prompt=config.negative_prompt, generator=_generator(job.seed), **conditioning)
            self._keep(subject, job, image, start)
        return facts

    def _keep(self, subject, job: EvalJob, image, start: float) -> None:
        """Write the image atomically, then journal it."""
        with atomic_path(self.config.out / job.path) as partial:
            image.save(partial, format="PNG")
        Journal(journal_path(self.config.out, job.seed_set, subject.name)).append(
            {"path": job.path, "seed": job.seed, "seconds": round(time.perf_counter() - start, 4)})


class SubjectScorer:
    """The metric models (a Ray actor), loaded once; scores a subject's images against its real photos."""

    def __init__(self, dino: str, clip: str, out: Path):
        from blipdiff.models.metrics import ClipEmbedder, DinoEmbedder

        device = resolve_device()
        self.dino, self.clip, self.out = DinoEmbedder(dino, device), ClipEmbedder(clip, device), out

    def score(self, bench, jobs: list[EvalJob]) -> list[dict]:
        from blipdiff.tasks.evaluation.score import score_images

        scored = []
        for seed_set in sorted({job.seed_set for job in jobs}):
            mine = {str((self.out / job.path).resolve()): job for job in jobs if job.seed_set == seed_set}
            rows = [{**job.row(), "path": Path(path)} for path, job in mine.items()]
            for row in score_images(rows, bench, self.dino, self.clip, log=lambda message: None):
                job = mine[row["path"]]
                scored.append({**row, "seed_set": seed_set, "path": job.path})
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


def generate_and_score(config: EvalConfig, bench, subjects, jobs: list[EvalJob], done: set[str],
                        log: Callable[[str], None], progress: Callable[[int, int], None] | None) -> tuple[list, dict]:
    """Every subject's missing images on the generation actors, each subject scored once its images exist."""
    import ray

    from blipdiff.infra.ray_cluster import connect_ray

    connect_ray()
    pending_subjects = [s for s in subjects if any(j.subject == s.name and j.path not in done for j in jobs)]
    actors = min(config.actors, len(pending_subjects))
    generation, metrics = _resources(actors)
    scorer = ray.remote(SubjectScorer).options(**metrics).remote(config.dino, config.clip, config.out)
    generators = [ray.remote(SubjectGenerator).options(**generation).remote(config) for _ in range(actors)]
    by_subject = {s.name: [j for j in jobs if j.subject == s.name] for s in subjects}
    generating = {}
    scoring = []
    facts: dict[str, dict] = {}
    try:
        for subject in subjects:
            if subject in pending_subjects:
                missing = [job for job in by_subject[subject.name] if job.path not in done]
                # Dealt by their place among the pending ones: on a resumed run, finished subjects would
                # otherwise leave some actors idle and pile the rest onto others.
                actor = generators[pending_subjects.index(subject) % len(generators)]
                generating[actor.generate.remote(subject, missing)] = subject
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
            log(f"{subject.name}: {sum(j.path not in done for j in by_subject[subject.name])} images made")
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
