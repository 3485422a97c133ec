"""``blipdiff pretrain`` on Ray Train: the target latents cached, the records written, then a
``TorchTrainer`` runs ``worker.train_worker`` on every worker (DDP over NCCL on GPUs, gloo on CPUs),
each fed by its own Ray Data stream of samples.

Ray Train's own checkpoints are not used: every checkpoint is already a model folder in the official
layout on a path every node sees, and a worker group that Ray restarts after a failure
(``FailureConfig``) resumes from the newest of them, as a rerun of the command does. Each worker builds
its stream from the positions it reads (see ``datasets.training_pairs``) rather than taking a split of one
shared dataset, since a streaming split hands blocks to whichever worker asks first: the sample order,
and so resuming exactly, would depend on timing.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from blipdiff.infra import ray_train
from blipdiff.infra.atomic import atomic_path, write_json_atomic
from blipdiff.tasks.pretrain.config import (METRICS_FILE, PROGRESS_FILE, RECORDS, PretrainConfig, Worker, check_run_folder,
                                            checkpoint_step, checkpoints, record_settings)

if TYPE_CHECKING:
    import pyarrow as pa

SKIPPED = "skipped.json"


@dataclass
class PretrainSummary:
    run: Path
    step: int
    checkpoint: Path | None
    pairs: int
    held_out: int
    skipped: Counter
    final_loss: float | None


def prepare_records(config: PretrainConfig, log: Callable[[str], None]) -> tuple[pa.Table, pa.Table, Counter]:
    """Encode the targets' latents where missing (with the VAE that will be trained against), then
    gather the training and held-out records, and what was skipped by reason."""
    from blipdiff.datasets.latents import EncodeLatentsConfig, encode_latents
    from blipdiff.datasets.training_pairs import collect_records, split_validation

    folders = []
    for pairs in config.pairs:
        summary = encode_latents(EncodeLatentsConfig(pairs=pairs, model=config.latent_model(),
                                                     resolution=config.resolution, actors=config.latent_actors),
                                 log=log)
        folders.append((pairs, summary.folder))
    records, skipped = collect_records(folders)
    training, held = split_validation(records, config.validation_pairs, config.seed)
    if training.num_rows == 0:
        raise ValueError(f"no usable pairs in {', '.join(map(str, config.pairs))}"
                         + "".join(f"; {count} skipped: {reason}" for reason, count in skipped.items()))
    log(f"{training.num_rows} pairs to train on, {held.num_rows} held out for validation"
        + "".join(f", {count} skipped ({reason})" for reason, count in skipped.items()))
    return training, held, skipped


def write_records(config: PretrainConfig, training: pa.Table, held: pa.Table, skipped: Counter) -> None:
    """``RUN/records/``: what every worker reads, and the pairs left out by reason. The training
    records are written last: their presence marks the run's records as complete."""
    import pyarrow.parquet as pq

    write_json_atomic(dict(skipped), config.out / RECORDS / SKIPPED)
    for name, table in (("validation.parquet", held), ("train.parquet", training)):
        with atomic_path(config.out / RECORDS / name) as temp:
            pq.write_table(table, temp)


def read_skipped(config: PretrainConfig) -> dict[str, int]:
    path = config.out / RECORDS / SKIPPED
    return json.loads(path.read_text()) if path.is_file() else {}


def _sample_stream(config: PretrainConfig, rank: int, first_step: int, recipe):
    """This worker's micro-batches from ``first_step`` on, made by Ray Data tasks in order."""
    import ray.data

    from blipdiff.datasets.training_pairs import WorkerSchedule, make_samples

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    schedule = WorkerSchedule(rank=rank, workers=config.workers, batch_size=config.batch_size,
                              accumulation=config.grad_accum)
    rows = (config.steps - first_step) * config.batch_size * config.grad_accum
    samples = ray.data.range(rows).map_batches(
        make_samples, batch_size=config.batch_size, batch_format="numpy",
        fn_kwargs={"records_path": str((config.out / RECORDS / "train.parquet").resolve()), "schedule": schedule,
                   "first_step": first_step, "recipe": recipe})
    yield from samples.iter_batches(batch_size=config.batch_size, batch_format="numpy", prefetch_batches=4)


def _train_loop(loop_config: dict) -> None:
    """What each Ray Train worker runs."""
    from blipdiff.tasks.pretrain.worker import train_worker

    config = PretrainConfig.model_validate(loop_config)
    worker = Worker(*ray_train.worker_place())
    train_worker(config, worker, lambda first_step, recipe: _sample_stream(config, worker.rank, first_step, recipe))


class _ProgressWatcher:
    """Follows ``RUN/progress.json`` (rank 0 rewrites it every few steps) while the trainer runs, for
    the progress bar and the Prefect flow's progress."""

    def __init__(self, run: Path, on_progress: Callable[[dict], None]):
        self.path, self.on_progress = run / PROGRESS_FILE, on_progress
        self.stop = threading.Event()
        self.seen: float | None = None
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(1.0):
            self.poll()

    def poll(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
            if mtime != self.seen:
                self.seen = mtime
                self.on_progress(json.loads(self.path.read_text()))
        except (OSError, ValueError):
            pass  # not written yet, or being replaced

    def __enter__(self) -> _ProgressWatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.poll()


def run_pretrain(config: PretrainConfig, log: Callable[[str], None] = print,
                 on_progress: Callable[[dict], None] | None = None) -> PretrainSummary:
    """Pre-train into ``config.out``, resuming from its newest checkpoint; a finished run is not redone."""
    from blipdiff.models.blip_diffusion import checkpoint

    recorded = check_run_folder(config)
    done = checkpoints(config.out)
    if done and checkpoint_step(done[-1]) >= config.steps:
        log(f"{config.out} already reached step {checkpoint_step(done[-1])}: {done[-1]}")
        return _summary(config)
    # Every input is checked before the run folder is made: a refused start leaves nothing behind, and
    # unusable starting points are found here, not on every worker after Ray has started them.
    checkpoint.resolve(config.init)
    if config.reset_from_sd is not None:
        checkpoint.resolve(config.reset_from_sd, ("unet", "vae", "text_encoder"), kind="Stable Diffusion checkpoint")
    # A run keeps the records it started with, so that resuming reads the same samples in the same
    # order; pairs built since then train in a run of their own.
    started = recorded and (config.out / RECORDS / "train.parquet").is_file()
    if started:
        log(f"the run's pairs, as collected at its start: {_summary(config).pairs} to train on")
    else:
        training, held, skipped = prepare_records(config, log)

    ray_train.connect_workers(config.workers, reserve_cpu_for="the tasks that make the samples")
    config.out.mkdir(parents=True, exist_ok=True)
    if not recorded:
        record_settings(config)
    if not started:
        write_records(config, training, held, skipped)
    if done:
        log(f"resuming from {done[-1]}")
    with _ProgressWatcher(config.out, on_progress or (lambda progress: None)):
        ray_train.fit(_train_loop, config.model_dump(mode="json"), name="pretrain", storage=config.out / "ray",
                      workers=config.workers, gpus_per_worker=config.gpus_per_worker,
                      max_failures=config.max_failures)
    return _summary(config)


def _summary(config: PretrainConfig) -> PretrainSummary:
    """The run as its folder has it."""
    import pyarrow.parquet as pq

    def rows(name: str) -> int:
        path = config.out / RECORDS / name
        return pq.read_metadata(path).num_rows if path.is_file() else 0

    saved = checkpoints(config.out)
    metrics = config.out / METRICS_FILE
    losses = pq.read_table(metrics, columns=["loss"]).column("loss").to_pylist() if metrics.is_file() else []
    return PretrainSummary(run=config.out, step=checkpoint_step(saved[-1]) if saved else 0,
                           checkpoint=saved[-1] if saved else None, pairs=rows("train.parquet"),
                           held_out=rows("validation.parquet"), skipped=Counter(read_skipped(config)),
                           final_loss=losses[-1] if losses else None)

