"""The one way training runs on Ray Train (pre-training, DreamBooth): join the cluster, start the workers
(one CPU each, and a GPU share when the cluster has GPUs), and tell a worker where it sits.

Ray Train's own checkpoints are not used: a run's checkpoints are folders on a path every node sees, and a
worker group that Ray restarts after a failure (``max_failures``) resumes from the newest of them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from blipdiff.infra.ray_cluster import cluster_has_gpus, connect_ray


def connect_workers(workers: int, reserve_cpu_for: str | None = None) -> None:
    """Join Ray; with ``reserve_cpu_for`` (what runs beside the workers), refuse a cluster without a CPU
    for each worker and one more, before anything is written."""
    import ray

    connect_ray()
    if reserve_cpu_for is not None:
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < workers + 1:
            raise ValueError(f"{workers} workers need {workers + 1} CPUs of the Ray cluster (one each, and one at "
                             f"least for {reserve_cpu_for}); it has {cpus:g}")


def fit(train_loop: Callable[[dict], None], loop_config: dict, *, name: str, storage: Path, workers: int,
        gpus_per_worker: float | None, max_failures: int) -> None:
    """Run ``train_loop(loop_config)`` on ``workers`` Ray Train workers (DDP's process group set up: NCCL on
    GPUs, gloo on CPUs) until they finish. ``gpus_per_worker`` None: 1 when the cluster has GPUs, else 0.
    ``train_loop`` must be a module-level function: Ray sends it to the workers by reference."""
    import ray.train
    from ray.train.torch import TorchTrainer

    gpus = gpus_per_worker if gpus_per_worker is not None else float(cluster_has_gpus())
    TorchTrainer(
        train_loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpus > 0,
                                               resources_per_worker={"CPU": 1, **({"GPU": gpus} if gpus else {})}),
        run_config=ray.train.RunConfig(storage_path=str(storage.resolve()), name=name,
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures)),
    ).fit()


def worker_place():
    """(rank, world size, torch device) of the Ray Train worker this runs in."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()
