"""One GPU, one stage at a time: the GPU stages hold a slot of a Prefect global concurrency limit.

``blipdiff serve`` creates (or resizes) the limit ``blipdiff-gpu`` with as many slots as there are GPUs
(``--gpu-slots``, 1 by default). Pre-training, evaluation, the latents and a build with BLIP-2 or CLIPSeg
hold one slot for as long as they use the GPU, so a second one waits, in the UI's Concurrency page and in
its run's logs, until the first is done. Without the limit (a flow run with no ``blipdiff serve`` set up)
the stages run at once, as before.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

GPU_LIMIT = "blipdiff-gpu"


@contextmanager
def gpu_slot(stage: str) -> Iterator[None]:
    """Hold one slot of ``blipdiff-gpu`` while the block runs; wait for one first."""
    from prefect import get_run_logger
    from prefect.concurrency.sync import concurrency

    logger = get_run_logger()
    logger.info("%s: waiting for a slot of the GPU concurrency limit %r", stage, GPU_LIMIT)
    asked = time.monotonic()
    # Training holds its slot for days: the lease is renewed in the background while the block runs.
    with concurrency(GPU_LIMIT, occupy=1, strict=False):
        logger.info("%s: got a GPU slot after %.1f s", stage, time.monotonic() - asked)
        yield


def ensure_gpu_limit(slots: int) -> None:
    """Create ``blipdiff-gpu`` with ``slots`` slots, or resize it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))
        else:
            client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=slots, active=True))
