"""Prefect tasks, one per stage: each calls the stage's own function, which is idempotent over its
output folder, so a retried or repeated task never duplicates work or mixes outputs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipdiff.datasets.build import BuildConfig, BuildSummary, build_pairs
from blipdiff.datasets.catalog import CatalogConfig, CatalogSummary, catalog_pairs
from blipdiff.datasets.fetch import FetchConfig, FetchSummary, fetch_images
from blipdiff.datasets.latents import EncodeLatentsConfig, LatentSummary
from blipdiff.datasets.openimages import FilterConfig, Funnel, run_filter
from blipdiff.tasks.evaluation.config import EvalConfig
from blipdiff.tasks.pretrain.config import PretrainConfig
from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects


@dataclass
class OutputsIntact(CachePolicy):
    """Inputs and task source, the input files' size and mtime, and the bytes of the stage's manifests;
    no caching while a manifest is missing.

    The stage writes the same bytes for the same inputs, so from the second run on a result is reused
    exactly while its inputs are unchanged and its outputs stand as that run left them: an edited
    input file, or deleted or rewritten outputs, mean a new key (or none), and the stage runs again.
    """

    manifests: tuple[str, ...] = ()
    input_files: tuple[str, ...] = ()
    folder: str = "out"

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any):
        config = inputs["config"]
        folder = Path(getattr(config, self.folder))
        digests = []
        for name in self.manifests:
            path = folder / name
            if not path.is_file():
                return None
            digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
        signatures = []
        for field in self.input_files:
            stat = Path(getattr(config, field)).stat()
            signatures.append((stat.st_size, stat.st_mtime_ns))
        base = (INPUTS + TASK_SOURCE).compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        return hash_objects(base, *digests, *signatures, raise_on_failure=True)


# Transient failures (a lost worker, a network hiccup) are worth a retry.
RETRIES = {"retries": 2, "retry_delay_seconds": 10}


@task(name="filter", persist_result=True, **RETRIES,
      cache_policy=OutputsIntact(manifests=("subjects.parquet", "funnel.json"), input_files=("boxes", "classes")))
def filter_task(config: FilterConfig) -> Funnel:
    return run_filter(config).funnel


@task(name="fetch", persist_result=True, **RETRIES,
      cache_policy=OutputsIntact(manifests=("images.parquet", "rejects.parquet"), input_files=("subjects",)))
def fetch_task(config: FetchConfig) -> FetchSummary:
    return fetch_images(config)


# A shard writes its own manifests (``config.manifests``); its images and journal entries go to the
# shared build folder, whose journal also skips finished subjects when the cache cannot be used.
@task(name="build shard", persist_result=True, **RETRIES,
      cache_policy=OutputsIntact(manifests=("pairs.parquet", "rejects.parquet"), input_files=("subjects",),
                                 folder="manifest_folder"))
def build_task(config: BuildConfig) -> BuildSummary:
    return build_pairs(config)


# Not cached: the catalog lives in a database that can change under any file-based key; the step
# mirrors the manifests instead, so a rerun over an up-to-date dataset adds nothing.
@task(name="catalog", **RETRIES)
def catalog_task(config: CatalogConfig) -> CatalogSummary:
    return catalog_pairs(config)


def _not_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Retry what may pass the next time (a lost node), not a refused input (a ValueError says why)."""
    return not isinstance(state.result(raise_on_failure=False), ValueError)


# Not cached: the run folder's checkpoints are its state, and training resumes from the newest one, so a
# retry after a lost worker or node goes on from there.
@task(name="pretrain", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=30, retry_condition_fn=_not_bad_input)
def pretrain_task(config: PretrainConfig, on_progress: Callable[[dict], None] | None = None):
    from blipdiff.tasks.pretrain.launch import run_pretrain

    return run_pretrain(config, on_progress=on_progress)


# Not cached: the run folder's journal is its state, so a retry (a lost node) makes only the images that
# were not finished, and scores and reports everything again.
@task(name="dreambench eval", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=30,
      retry_condition_fn=_not_bad_input)
def eval_task(config: EvalConfig, on_progress: Callable[[int, int], None] | None = None) -> dict:
    from blipdiff.tasks.evaluation.run import run_eval

    return run_eval(config, progress=on_progress)


# Not cached: the latents folder is its own cache (a file per pair, written atomically), so a rerun encodes
# only what is missing.
@task(name="encode latents", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=30,
      retry_condition_fn=_not_bad_input)
def latents_task(config: EncodeLatentsConfig, on_progress: Callable[[int, int], None] | None = None) -> LatentSummary:
    from blipdiff.datasets.latents import encode_latents

    return encode_latents(config, progress=on_progress)
