"""The one way every stage reaches Ray: the cluster at ``RAY_ADDRESS`` when set, else a local one."""

from __future__ import annotations

import logging
import os


def connect_ray() -> None:
    """Join the running Ray (a test's, a flow's) or start one; workers' logs stay out of the console,
    where progress is reported by the stages themselves."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
