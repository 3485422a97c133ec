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

Generation fans out over Ray actors (``actors.py``); the metric models run in an actor of their own,
scoring each subject as soon as its images are done.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from blipdiff.infra.atomic import atomic_path, remove_stale_temporaries, write_json_atomic
from blipdiff.infra.inputs import readable_image
from blipdiff.infra.journal import Journal
from blipdiff.infra.run_folder import claim_run_folder, record_run_folder
from blipdiff.tasks.evaluation.actors import generate_and_score
from blipdiff.tasks.evaluation.baseline import report_notes, timing_path, train_dreambooth
from blipdiff.tasks.evaluation.config import (GENERATIONS, SCORES, SETTINGS_FILE, SUMMARY, EvalConfig, EvalJob,
                                              image_path, image_seed, journal_path, reference_photos)
from blipdiff.tasks.evaluation.score import METRICS, summarize


def plan(config: EvalConfig):
    """The benchmark, the subjects and every image to make, after every input has been checked."""
    from blipdiff.datasets.dreambench import FINETUNE_STEPS, read_dreambench
    from blipdiff.models.blip_diffusion import checkpoint

    # On the driver first: a wrong model is a one-line error, and a hub id is fetched once for every actor.
    if config.method == "dreambooth":
        from blipdiff.models.stable_diffusion import resolve_base

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
                    jobs.append(EvalJob(
                        seed_set=seed_set, subject=subject.name, class_name=subject.class_name, live=subject.live,
                        prompt_index=prompt.index, prompt=prompt.text, kind=prompt.kind, image_index=image_index,
                        text_encoder_prompt=prompt.dreambooth_text(config.identifier)
                        if config.method == "dreambooth" else prompt.blip_diffusion_text,
                        seed=image_seed(seed_set, subject.name, prompt.index, image_index),
                        path=image_path(seed_set, subject.name, prompt.index, image_index)))
    return bench, subjects, jobs


def check_run_folder(config: EvalConfig) -> None:
    """A run folder holds one run: a rerun with other settings is refused, so outputs never mix."""
    claim_run_folder(config.out, config.settings(), record=SETTINGS_FILE, other="an evaluation",
                     run="evaluation run")


def finished(out: Path, jobs: list[EvalJob]) -> set[str]:
    """The images journaled and still on disk."""
    done = set()
    for seed_set, subject in {(job.seed_set, job.subject) for job in jobs}:
        for entry in Journal(journal_path(out, seed_set, subject)).load():
            if (out / entry["path"]).is_file():
                done.add(entry["path"])
    return done


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
    from blipdiff.models.blip_diffusion.subject_checkpoint import SUBJECT_FILE, read_subject_record

    known = {}
    for subject in subjects:
        if subject.name in facts and facts[subject.name]:
            known[subject.name] = facts[subject.name]
        elif timing_path(out, subject.name).is_file():
            known[subject.name] = json.loads(timing_path(out, subject.name).read_text())
        elif (out / "finetuned" / subject.name / SUBJECT_FILE).is_file():
            record = read_subject_record(out / "finetuned" / subject.name)
            known[subject.name] = {"finetune_steps": record["settings"]["steps"],
                                   "finetune_seconds": sum(record.get("seconds", {}).values()),
                                   "subject_checkpoint": f"finetuned/{subject.name}"}
    return known


def run_eval(config: EvalConfig, log: Callable[[str], None] = print,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Generate what is missing, score everything, write the outputs and the report (and the catalog);
    return the summary."""
    import pandas as pd

    from blipdiff.tasks.evaluation.report import write_report

    bench, subjects, jobs = plan(config)
    check_run_folder(config)
    (config.out / "journal").mkdir(parents=True, exist_ok=True)
    record_run_folder(config.out, config.settings(), SETTINGS_FILE)
    for folder in {(config.out / job.path).parent for job in jobs}:
        remove_stale_temporaries(folder)
    done = finished(config.out, jobs)
    log(f"{len(jobs)} images of {len(subjects)} subjects: {len(done)} already made, {len(jobs) - len(done)} to make")
    if config.method == "dreambooth":
        train_dreambooth(config, subjects, log)
    started = time.perf_counter()
    scores, facts = generate_and_score(config, bench, subjects, jobs, done, log, progress)
    seconds = time.perf_counter() - started
    facts = _subject_facts(config.out, subjects, facts)

    settings = config.settings()
    # To the millisecond: history orders runs by it, and two runs of a small benchmark can end in one second.
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    versions = json.dumps({name: version(name) for name in ("blipdiff", "torch", "diffusers", "transformers")})
    generations = pd.DataFrame([{**job.row(), **facts.get(job.subject, {})} for job in jobs])
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
        from blipdiff.tasks.evaluation.catalog import catalog_evaluation

        summary["catalog"] = catalog_evaluation(config.out, config.dataset).as_dict()
        write_json_atomic(summary, config.out / SUMMARY)
    log(f"scores -> {config.out / SCORES}; report -> {config.out / 'report.md'}")
    return summary
