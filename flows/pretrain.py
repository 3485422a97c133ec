"""The `pretrain` flow: stage-2 pre-training on Ray Train, triggered from the Prefect UI.

Its parameters are ``PretrainConfig`` itself, so the UI's form, the CLI and the tests share one model.
The training task resumes from the run's newest checkpoint, so a retried task, or a run triggered
again with the same parameters, goes on where the last one stopped. Artifacts: the training progress
(updated while the task runs), the loss curve, the latest validation grid and where the checkpoints are.
"""

from __future__ import annotations

from blipdiff.flows.events import CheckpointAnnouncer
from blipdiff.flows.gpu import gpu_slot
from blipdiff.tasks.pretrain.config import PretrainConfig
from blipdiff.tasks.prefect_tasks import pretrain_task
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact


@flow(name="pretrain", log_prints=True)
def pretrain_flow(parameters: PretrainConfig) -> dict:
    """Pre-train BLIP-Diffusion on built pairs (resuming the run folder's newest checkpoint)."""
    from blipdiff.flows.artifacts import inline_png, plot_loss_curve

    progress = create_progress_artifact(progress=0.0, key="pretrain-progress", description="training steps done")

    # Each checkpoint is announced as soon as it is complete, so its evaluation can start while training goes on.
    announcer = CheckpointAnnouncer(parameters.out, parameters.checkpoint_every)

    def on_progress(record: dict) -> None:
        update_progress_artifact(progress, progress=100.0 * record["step"] / record["steps"])
        announcer.poll()

    with gpu_slot("pretrain"):
        summary = pretrain_task(parameters, on_progress)
    announcer.poll()  # the final checkpoint, written after the last progress record
    update_progress_artifact(progress, progress=100.0 * summary.step / parameters.steps)
    run = parameters.out
    curve = plot_loss_curve(run / "metrics.parquet", run / "loss.png")
    grids = sorted((run / "validation").glob("step-*.png"))
    sections = [
        f"# pretrain: step {summary.step:,} of {parameters.steps:,}\n",
        f"- checkpoints (official layout, loadable by `blipdiff generate`): `{run / 'checkpoints'}`; latest "
        f"`{summary.checkpoint}`",
        f"- metrics: `{run / 'metrics.parquet'}`; TensorBoard: `tensorboard --logdir {run / 'logs'}`",
        f"- pairs: {summary.pairs:,} trained on, {summary.held_out:,} held out"
        + "".join(f", {count:,} skipped ({reason})" for reason, count in summary.skipped.items()),
        f"- last loss: {summary.final_loss:.4f}" if summary.final_loss is not None else "- no loss recorded",
    ]
    if curve is not None:
        sections += ["\n## Loss\n", inline_png(curve, 640)]
    if grids:
        sections += [f"\n## Validation, {grids[-1].stem}\n", f"`{grids[-1]}`\n", inline_png(grids[-1], 768)]
    create_markdown_artifact(key="pretrain-summary", markdown="\n".join(sections))
    return {"step": summary.step, "checkpoint": str(summary.checkpoint), "pairs": summary.pairs,
            "final_loss": summary.final_loss}
