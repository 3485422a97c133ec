"""The `dreambench_eval` flow: a model, or the newest checkpoint of a training run, on DreamBench, every night.

Its parameters are one pydantic model (the UI's form): the protocol (``EvalSettings``: a subset of
subjects, prompts and images per prompt for a cheap nightly tier, the whole benchmark on demand), what to
evaluate (``model``, or ``training_run``, whose newest complete checkpoint is taken when the run starts),
and ``eval_root``, which holds one folder per run and the history. Each run is appended to
``EVAL_ROOT/history.parquet`` and compared with the previous comparable run (same protocol fingerprint)
and the pinned baseline (``blipdiff pin-baseline``). A regressed run ends Failed, with a markdown artifact
that says what regressed, so that Prefect automations and notifications can act on it; otherwise it
completes with the trend table, a trend plot, the per-subject deltas and where the run and its FiftyOne
dataset are.
"""

from __future__ import annotations

from pathlib import Path

from blipdiff.flows.events import emit_evaluation_finished
from blipdiff.flows.gpu import gpu_slot
from blipdiff.tasks.evaluation.config import EvalConfig, EvalSettings
from blipdiff.tasks.prefect_tasks import eval_task
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from pydantic import Field, model_validator

PAPER_TABLE_1 = "the paper's Table 1"


class DreamBenchEvalParameters(EvalSettings):
    """One nightly (or on-demand) DreamBench evaluation; the Prefect UI renders it as a form."""

    eval_root: Path = Field(description="Folder of the evaluations: one folder per run, history.parquet, baseline.json.")
    model: str | None = Field(None, description="A fixed model: hub id or checkpoint folder (the official layout).")
    training_run: Path | None = Field(None, description="Or a `blipdiff pretrain` run folder: its newest checkpoint.")

    @model_validator(mode="after")
    def _one_model(self) -> DreamBenchEvalParameters:
        if (self.model is None) == (self.training_run is None):
            raise ValueError("give model (a fixed model) or training_run (its newest checkpoint), one of them")
        return self

    def model_and_step(self) -> tuple[str, int | None]:
        """The model to evaluate and its training step, resolved now."""
        from blipdiff.tasks.pretrain.config import CHECKPOINTS, checkpoint_step, checkpoints

        if self.model is not None:
            # A complete checkpoint of a training run (what the chain's triggers pass) keeps its step.
            folder = Path(self.model).expanduser().resolve()
            if folder.parent.name == CHECKPOINTS and folder in [path.resolve() for path in checkpoints(folder.parent.parent)]:
                return self.model, checkpoint_step(folder)
            return self.model, None
        found = checkpoints(self.training_run)
        if not found:
            raise ValueError(f"{self.training_run} has no complete checkpoint yet")
        return str(found[-1].resolve()), checkpoint_step(found[-1])


def _run_name(step: int | None) -> str:
    """The run's folder: when it was scheduled (stable across retries of the flow run) and its flow run."""
    from prefect.runtime import flow_run

    started = flow_run.scheduled_start_time
    return f"{started:%Y%m%dT%H%M%SZ}-{str(flow_run.id)[:8]}" + (f"-step{step}" if step is not None else "")


def _trend_markdown(runs: list[dict]) -> list[str]:
    lines = ["| run | model step | images | DINO | CLIP-I | CLIP-T |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in runs[-10:]:
        step = "" if row["checkpoint_step"] is None else f"{row['checkpoint_step']:,}"
        lines.append(f"| {row['run_id']} | {step} | {row['images']:,} | {row['dino']:.4f} | {row['clip_i']:.4f} | "
                     f"{row['clip_t']:.4f} |")
    return lines


def _subject_deltas(current: dict, previous: dict | None) -> list[str]:
    if previous is None:
        return ["No earlier comparable run: the per-subject deltas start with the next one."]
    lines = [f"Against {previous['run_id']}:\n", "| subject | DINO | CLIP-I | CLIP-T |", "| --- | ---: | ---: | ---: |"]
    for subject, values in current["per_subject"].items():
        before = previous["per_subject"].get(subject)
        if before is not None:
            lines.append(f"| {subject} | " + " | ".join(f"{values[m] - before[m]:+.4f}" for m in ("dino", "clip_i", "clip_t"))
                         + " |")
    return lines


@flow(name="dreambench_eval", log_prints=True)
def dreambench_eval_flow(parameters: DreamBenchEvalParameters):
    """Evaluate a model (or a training run's newest checkpoint) on DreamBench; fail on a regression."""
    from prefect.states import Completed, Failed

    from blipdiff.flows.artifacts import inline_png
    from blipdiff.tasks.evaluation.history import (append_run, baseline_run, comparable, history_record,
                                                    previous_comparable, read_history, regressions)
    from blipdiff.tasks.evaluation.report import PAPER_MEANS, plot_trend

    logger = get_run_logger()
    model, step = parameters.model_and_step()
    settings = parameters.model_dump(include=set(EvalSettings.model_fields))
    config = EvalConfig(**settings, model=model, out=parameters.eval_root / _run_name(step), checkpoint_step=step)
    logger.info("evaluating %s (step %s) into %s", model, step, config.out)
    progress = create_progress_artifact(progress=0.0, key="dreambench-progress", description="subjects done")
    with gpu_slot("dreambench_eval"):
        summary = eval_task(config, lambda done, total: update_progress_artifact(progress, progress=100.0 * done / total))

    root = parameters.eval_root
    record = history_record(summary, config.protocol(), config.out)
    history = [row for row in read_history(root) if row["run_id"] != record["run_id"]]
    previous = previous_comparable(history, record)
    found = regressions(record, history, baseline_run(root, history))
    append_run(root, record)
    runs = comparable(read_history(root), record)
    trend = plot_trend(runs, config.mode, config.out / "trend.png")

    paper = PAPER_MEANS[config.mode]
    catalog = summary.get("catalog")
    sections = [f"# dreambench_eval: {config.run_id}\n",
                f"- model: `{model}`" + (f" (step {step:,})" if step is not None else ""),
                f"- {summary['images']:,} images of {summary['subjects']} subjects, {config.mode}; mean over subjects "
                + ", ".join(f"{m} {summary['mean_over_subjects'][m]:.4f} (paper {paper[m]:.3f})" for m in paper),
                f"- run folder: `{config.out}`; report: `{config.out / 'report.md'}`",
                f"- history: `{root / 'history.parquet'}` ({len(runs)} comparable runs, fingerprint "
                f"`{record['fingerprint']}`)"]
    if catalog:
        sections.append(f"- FiftyOne dataset `{catalog['dataset']}` (saved view `latest-run`): "
                        f"`blipdiff app --dataset {catalog['dataset']}`")
    if found:
        sections[0] = f"# dreambench_eval REGRESSED: {config.run_id}\n"
        sections += ["\n## What regressed\n", *[f"- {regression.describe()}" for regression in found]]
    sections += ["\n## Trend (comparable runs)\n", *_trend_markdown(runs), "", inline_png(trend, 900),
                 "\n## Per-subject deltas\n", *_subject_deltas(record, previous)]
    create_markdown_artifact(key="dreambench-eval", markdown="\n".join(sections),
                             description="DreamBench evaluation: regressions, trend, per-subject deltas")
    result = {"run_id": config.run_id, "run_folder": str(config.out), "model": model, "checkpoint_step": step,
              **{m: summary["mean_over_subjects"][m] for m in ("dino", "clip_i", "clip_t")},
              "regressions": [regression.describe() for regression in found]}
    emit_evaluation_finished(result)
    if found:
        return Failed(message="DreamBench regressed: " + "; ".join(r.describe() for r in found), data=result)
    return Completed(message="no regression", data=result)
