"""The events the stages emit, under one prefix, for the chain's triggers and for anyone watching.

| event | resource | payload |
| --- | --- | --- |
| ``blipdiff.pairs.built`` | ``blipdiff.data.<data folder>`` | ``data``, ``pairs``, ``subjects``, ``dataset`` |
| ``blipdiff.pretrain.checkpoint.written`` | ``blipdiff.checkpoint.<checkpoint folder>`` | ``run``, ``step``, ``checkpoint``, ``ordinal`` |
| ``blipdiff.evaluation.finished`` | ``blipdiff.evaluation.<run folder>`` | ``run_id``, ``run_folder``, ``model``, ``checkpoint_step``, the means, ``regressed``, ``regressions`` |

Every resource also carries ``blipdiff.subflow`` ("true" inside a parent flow such as
``blip_diffusion_pipeline``, which drives its own next stage, so the chain's triggers leave those events
alone). A checkpoint's resource carries ``blipdiff.checkpoint.every``: the K for which it is a K-th
checkpoint of its run, as ``/1/2/4/`` (its ordinal's divisors), because Prefect's triggers match labels
with globs and cannot do arithmetic: ``*/K/*`` matches exactly the K-th checkpoints. The final checkpoint
of a run whose steps are not a multiple of ``checkpoint_every`` has an empty list.
"""

from __future__ import annotations

import threading
from pathlib import Path

PREFIX = "blipdiff"
PAIRS_BUILT = f"{PREFIX}.pairs.built"
CHECKPOINT_WRITTEN = f"{PREFIX}.pretrain.checkpoint.written"
EVALUATION_FINISHED = f"{PREFIX}.evaluation.finished"

SUBFLOW_LABEL = f"{PREFIX}.subflow"
EVERY_LABEL = f"{PREFIX}.checkpoint.every"


def _run_context() -> tuple[list[dict[str, str]], str]:
    """The current flow run as a related resource (so the UI links the event to its run), and whether it
    runs inside a parent flow. Read once, in the flow's own thread: the training's progress callbacks
    run in a thread of their own, where Prefect's run context is not set."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return [], "false"
    run = context.flow_run
    related = [{"prefect.resource.id": f"prefect.flow-run.{run.id}", "prefect.resource.role": "flow-run",
                "prefect.resource.name": run.name}]
    return related, "true" if run.parent_task_run_id is not None else "false"


def emit_pairs_built(data: Path, pairs: int, subjects: int, dataset: str) -> None:
    """A build finished with pairs to train on (a build that made none starts nothing)."""
    from prefect.events import emit_event

    if pairs <= 0:
        return
    related, subflow = _run_context()
    folder = Path(data).resolve()
    emit_event(PAIRS_BUILT, resource={"prefect.resource.id": f"{PREFIX}.data.{folder}", "prefect.resource.name": folder.name,
                                      SUBFLOW_LABEL: subflow},
               related=related, payload={"data": str(folder), "pairs": pairs, "subjects": subjects, "dataset": dataset})


def every_label(ordinal: int | None) -> str:
    """``/1/2/3/6/`` for the 6th checkpoint: every K for which it is a K-th one."""
    if not ordinal:
        return ""
    return "/" + "".join(f"{k}/" for k in range(1, ordinal + 1) if ordinal % k == 0)


class CheckpointAnnouncer:
    """Emits one ``blipdiff.pretrain.checkpoint.written`` per complete checkpoint that appears in a run folder
    while a flow run trains it. Checkpoints already there when it starts were announced by the run that
    wrote them, and a checkpoint still being written (no training state yet) is never announced, so a
    failed or interrupted save starts nothing downstream."""

    def __init__(self, run: Path, checkpoint_every: int):
        from blipdiff.tasks.pretrain.config import checkpoints

        self.run, self.checkpoint_every = Path(run), checkpoint_every
        self.announced = {path.name for path in checkpoints(self.run)} if self.run.is_dir() else set()
        self.related, self.subflow = _run_context()
        # Called from the training's progress thread and from the flow at the end.
        self.lock = threading.Lock()

    def poll(self, *_ignored) -> None:
        from prefect.events import emit_event

        from blipdiff.tasks.pretrain.config import checkpoint_step, checkpoints

        with self.lock:
            found = checkpoints(self.run) if self.run.is_dir() else []
            for checkpoint in found:
                if checkpoint.name in self.announced:
                    continue
                self.announced.add(checkpoint.name)
                step = checkpoint_step(checkpoint)
                ordinal = step // self.checkpoint_every if step % self.checkpoint_every == 0 else None
                folder = checkpoint.resolve()
                emit_event(CHECKPOINT_WRITTEN,
                           resource={"prefect.resource.id": f"{PREFIX}.checkpoint.{folder}",
                                     "prefect.resource.name": f"{self.run.name}/{checkpoint.name}",
                                     f"{PREFIX}.run": str(self.run), EVERY_LABEL: every_label(ordinal),
                                     SUBFLOW_LABEL: self.subflow},
                           related=self.related,
                           payload={"run": str(self.run), "step": step, "checkpoint": str(folder), "ordinal": ordinal})


def emit_evaluation_finished(result: dict) -> None:
    """An evaluation finished, regressed or not (a regressed run also ends Failed)."""
    from prefect.events import emit_event

    related, subflow = _run_context()
    regressed = bool(result["regressions"])
    model = str(result["model"])
    emit_event(EVALUATION_FINISHED,
               resource={"prefect.resource.id": f"{PREFIX}.evaluation.{result['run_folder']}",
                         "prefect.resource.name": result["run_id"], f"{PREFIX}.regressed": str(regressed).lower(),
                         SUBFLOW_LABEL: subflow},
               related=related + ([{"prefect.resource.id": f"{PREFIX}.checkpoint.{model}",
                                    "prefect.resource.role": "checkpoint"}] if result["checkpoint_step"] is not None else []),
               payload={**result, "regressed": regressed})
