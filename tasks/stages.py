"""Prefect tasks, one per stage: each calls the stage's own function, which is idempotent over its
output folder, so a retried or repeated task never duplicates work or mixes outputs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy

from blipdiff.datasets.build import BuildConfig, BuildSummary, build_pairs
from blipdiff.datasets.fetch import FetchConfig, FetchSummary, fetch_images
from blipdiff.datasets.openimages import FilterConfig, Funnel, run_filter


def _outputs_signature(names: tuple[str, ...]):
    """A cache-key part that changes whenever the stage's output files change or disappear, so a
    cached result is never returned for outputs that are gone or were rewritten since."""

    def signature(_context: Any, inputs: dict[str, Any]) -> str:
        out = Path(inputs["config"].out)
        stats = []
        for name in names:
            path = out / name
            stats.append(f"{name}:{path.stat().st_size}:{path.stat().st_mtime_ns}" if path.is_file() else f"{name}:-")
        return hashlib.sha256("|".join(stats).encode()).hexdigest()

    return CacheKeyFnPolicy(cache_key_fn=signature)


# Cached across runs on the inputs, the code and the outputs' state; transient failures are retried.
RETRIES = {"retries": 2, "retry_delay_seconds": 10}


@task(name="filter", cache_policy=INPUTS + TASK_SOURCE + _outputs_signature(("subjects.parquet", "funnel.json")),
      persist_result=True, **RETRIES)
def filter_task(config: FilterConfig) -> Funnel:
    return run_filter(config).funnel


@task(name="fetch", cache_policy=INPUTS + TASK_SOURCE + _outputs_signature(("images.parquet", "rejects.parquet")),
      persist_result=True, **RETRIES)
def fetch_task(config: FetchConfig) -> FetchSummary:
    return fetch_images(config)


# No result cache: a shard's pairs live in the build's journal, which skips finished subjects itself.
@task(name="build shard", **RETRIES)
def build_task(config: BuildConfig) -> BuildSummary:
    return build_pairs(config)
