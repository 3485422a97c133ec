"""The deployments of the flows, their triggers and schedules, and where they run.

``deployments()`` makes them; ``blipdiff serve`` serves the ones that run here and registers the GPU ones on
a work pool when one is named (a worker on a GPU machine runs those):

```bash
prefect work-pool create gpu --type process          # once, against the server
prefect worker start --pool gpu                      # on each GPU machine, with blipdiff installed
blipdiff serve --data DIR --chain chain.json --work-pool gpu
```

Triggers (Prefect automations, listed on the UI's Automations page, each can be turned off there or in
the chain's configuration):

- ``<name>: pairs built → pretrain``, on ``pretrain``: a ``blipdiff.pairs.built`` event (of a build that is
  not a subflow) starts ``pretrain`` on ``event.payload.data``, in ``OUT/<data folder's name>``;
- ``<name>: every K-th checkpoint → dreambench_eval``, on ``dreambench_eval``: a
  ``blipdiff.pretrain.checkpoint.written`` event whose checkpoint is a K-th one (label
  ``blipdiff.checkpoint.every`` matching ``*/K/*``) starts ``dreambench_eval`` on ``event.payload.checkpoint``.

Failed stages emit nothing (a build emits its event last, a checkpoint only once it is complete), so the
chain stops there; a regressed evaluation ends Failed and is the last stage.
"""

from __future__ import annotations

from pathlib import Path

from blipdiff.flows.chain import ChainConfig
from blipdiff.flows.events import CHECKPOINT_WRITTEN, EVERY_LABEL, PAIRS_BUILT, PREFIX, SUBFLOW_LABEL


def pretrain_trigger(chain: ChainConfig, name: str):
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"{name}: pairs built → pretrain", enabled=chain.pretrain_after_build,
        description="A finished build_pairs run starts pretrain on its data folder.",
        expect={PAIRS_BUILT}, match={"prefect.resource.id": f"{PREFIX}.data.*", SUBFLOW_LABEL: "false"},
        parameters=chain.pretrain.trigger_parameters())


def evaluation_trigger(chain: ChainConfig, name: str):
    from prefect.events import DeploymentEventTrigger

    every = chain.evaluate_every
    return DeploymentEventTrigger(
        name=f"{name}: every {every}th checkpoint → dreambench_eval" if every > 1
        else f"{name}: every checkpoint → dreambench_eval",
        enabled=chain.evaluate_checkpoints,
        description=f"Every {every}-th checkpoint of a pre-training run starts dreambench_eval on it.",
        expect={CHECKPOINT_WRITTEN},
        match={"prefect.resource.id": f"{PREFIX}.checkpoint.*", EVERY_LABEL: f"*/{every}/*", SUBFLOW_LABEL: "false"},
        parameters=chain.evaluation.trigger_parameters())


def deployments(name: str, chain: ChainConfig, build_defaults: dict | None = None, cron=None,
                eval_defaults: dict | None = None, eval_cron=None, work_pool: str | None = None) -> tuple[list, list]:
    """The deployments to serve here and those for the work pool (none without one): the GPU stages
    (pre-training, evaluation, the pipeline, and a build with BLIP-2 or CLIPSeg) go to the pool."""
    from prefect.deployments.runner import EntrypointType

    from blipdiff.flows.build_pairs import BuildPairsParameters, build_pairs_flow
    from blipdiff.flows.chain import blip_diffusion_pipeline
    from blipdiff.flows.dreambench_eval import dreambench_eval_flow
    from blipdiff.flows.latents import encode_latents_flow
    from blipdiff.flows.pretrain import pretrain_flow

    here, pool = [], []

    def add(flow, gpu: bool, **options) -> None:
        if gpu and work_pool:
            # A worker imports the flow from the installed package, so no code is shipped to it.
            pool.append(flow.to_deployment(name=name, work_pool_name=work_pool,
                                           entrypoint_type=EntrypointType.MODULE_PATH, **options))
        else:
            here.append(flow.to_deployment(name=name, **options))

    # The flow's own rule on its form's defaults (unvalidated: the form may hold only some of its fields).
    build_uses_gpu = bool(build_defaults) and BuildPairsParameters.model_construct(
        **build_defaults["parameters"]).uses_gpu()
    add(build_pairs_flow, build_uses_gpu, parameters=build_defaults, schedules=[cron] if cron else [])
    add(pretrain_flow, True, triggers=[pretrain_trigger(chain, name)] if chain.pretrain else [])
    add(dreambench_eval_flow, True, parameters=eval_defaults, schedules=[eval_cron] if eval_cron else [],
        triggers=[evaluation_trigger(chain, name)] if chain.evaluation else [])
    add(encode_latents_flow, True)
    add(blip_diffusion_pipeline, True)
    return here, pool


def serve_chain(name: str, chain: ChainConfig, gpu_slots: int, work_pool: str | None = None, **options) -> None:
    """Set up the GPU limit, register the pool's deployments, and serve the rest until stopped."""
    from prefect import serve
    from prefect.deployments.runner import deploy

    from blipdiff.flows.gpu import ensure_gpu_limit

    ensure_gpu_limit(gpu_slots)
    here, pool = deployments(name, chain, work_pool=work_pool, **options)
    if pool:
        deploy(*pool, work_pool_name=work_pool, build=False, push=False, print_next_steps_message=False,
               ignore_warnings=True)
    serve(*here)


def read_chain(path: Path | None) -> ChainConfig:
    """The chain's configuration from its JSON file; none: no triggers, the stages run when asked."""
    return ChainConfig() if path is None else ChainConfig.model_validate_json(Path(path).read_text())
