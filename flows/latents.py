"""The `encode_latents` flow: every pair's target encoded once by the VAE that pre-training will train against.

Its parameters are ``EncodeLatentsConfig`` itself (the form, the CLI's ``blipdiff encode-latents`` and the
tests share it). Pre-training encodes what is missing on its own; as a stage of its own, in
``blip_diffusion_pipeline``, the encoding shows as a run with its progress, and holds the GPU slot only
for as long as it runs.
"""

from __future__ import annotations

from blipdiff.datasets.latents import EncodeLatentsConfig
from blipdiff.flows.gpu import gpu_slot
from blipdiff.tasks.prefect_tasks import latents_task
from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact


@flow(name="encode_latents", log_prints=True)
def encode_latents_flow(parameters: EncodeLatentsConfig) -> dict:
    """Encode the targets' latents that the cache of this VAE and resolution lacks."""
    progress = create_progress_artifact(progress=0.0, key="latents-progress", description="targets encoded")
    with gpu_slot("encode_latents"):
        summary = latents_task(parameters, lambda done, total: update_progress_artifact(
            progress, progress=100.0 * done / max(total, 1)))
    update_progress_artifact(progress, progress=100.0)
    return {"folder": str(summary.folder), "encoded": summary.encoded, "cached": summary.skipped,
            "missing": dict(summary.missing)}
