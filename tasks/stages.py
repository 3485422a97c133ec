"""Prefect tasks, one per stage: each calls the stage's own function, which is idempotent over its
output folder, so a retried or repeated task never duplicates work or mixes outputs."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from blipdiff.datasets.build import BuildConfig, BuildSummary, build_pairs
from blipdiff.datasets.fetch import FetchConfig, FetchSummary, fetch_images
from blipdiff.datasets.openimages import FilterConfig, Funnel, run_filter

# The stage functions skip what their output folders already hold, so a cached result is only a
# shortcut; transient failures (a worker lost, a network hiccup) are worth a retry.
STAGE_TASK = {"retries": 2, "retry_delay_seconds": 10, "cache_policy": INPUTS + TASK_SOURCE, "persist_result": True}


@task(name="filter", **STAGE_TASK)
def filter_task(config: FilterConfig) -> Funnel:
    return run_filter(config).funnel


@task(name="fetch", **STAGE_TASK)
def fetch_task(config: FetchConfig) -> FetchSummary:
    return fetch_images(config)


@task(name="build shard", **STAGE_TASK)
def build_task(config: BuildConfig) -> BuildSummary:
    return build_pairs(config)
