"""Prefect tasks, one per stage: each calls the stage's own function, which is idempotent over its
output folder, so a retried or repeated task never duplicates work or mixes outputs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects

from blipdiff.datasets.build import BuildConfig, BuildSummary, build_pairs
from blipdiff.datasets.fetch import FetchConfig, FetchSummary, fetch_images
from blipdiff.datasets.openimages import FilterConfig, Funnel, run_filter


@dataclass
class OutputsIntact(CachePolicy):
    """Inputs and task source, plus the bytes of the stage's manifests; no caching while they are missing.

    The stage writes the same bytes for the same inputs, so from the second run on a result is reused
    exactly while its outputs stand as that run left them: deleted or rewritten outputs mean a new
    key (or none), and the stage runs again.
    """

    manifests: tuple[str, ...] = ()

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any):
        out = Path(inputs["config"].out)
        digests = []
        for name in self.manifests:
            path = out / name
            if not path.is_file():
                return None
            digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
        base = (INPUTS + TASK_SOURCE).compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        return hash_objects(base, *digests, raise_on_failure=True)


# Transient failures (a lost worker, a network hiccup) are worth a retry.
RETRIES = {"retries": 2, "retry_delay_seconds": 10}


@task(name="filter", cache_policy=OutputsIntact(manifests=("subjects.parquet", "funnel.json")), persist_result=True, **RETRIES)
def filter_task(config: FilterConfig) -> Funnel:
    return run_filter(config).funnel


@task(name="fetch", cache_policy=OutputsIntact(manifests=("images.parquet", "rejects.parquet")), persist_result=True, **RETRIES)
def fetch_task(config: FetchConfig) -> FetchSummary:
    return fetch_images(config)


# No result cache: a shard's pairs live in the build's journal, which skips finished subjects itself.
@task(name="build shard", **RETRIES)
def build_task(config: BuildConfig) -> BuildSummary:
    return build_pairs(config)
