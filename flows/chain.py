"""The chain build → pre-training → evaluation: its configuration, and the parent flow that runs it as one run.

Served (``blipdiff serve --chain chain.json``), the stages start each other through Prefect events and
deployment triggers (``blipdiff.flows.deployments``): a finished ``build_pairs`` starts ``pretrain`` on its
folder, and every K-th checkpoint of a pre-training run starts ``dreambench_eval`` on that checkpoint.
``ChainConfig`` says what those triggered runs do; its parts are the stages' own parameter models, less the
fields that the events fill in.

``blip_diffusion_pipeline`` is the same chain as one run from one form, each stage a subflow: pairs →
latents → pre-training → evaluation of the newest checkpoint. Its subflows' events are marked as such, so
the served triggers leave them alone.
"""

from __future__ import annotations

from pathlib import Path

from blipdiff.datasets.latents import EncodeLatentsConfig
from blipdiff.flows.build_pairs import BuildPairsParameters, build_pairs_flow
from blipdiff.flows.dreambench_eval import DreamBenchEvalParameters, dreambench_eval_flow
from blipdiff.flows.latents import encode_latents_flow
from blipdiff.flows.pretrain import pretrain_flow
from blipdiff.tasks.evaluation.config import EvalSettings
from blipdiff.tasks.pretrain.config import PretrainConfig
from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field


class PretrainPlan(PretrainConfig):
    """The pre-training that built pairs start: ``PretrainConfig`` with its pairs left to the build, and
    ``out`` a folder of runs, one per data folder (``OUT/<data folder's name>``), so a rebuild of the same
    folder continues its run (which keeps the records it started with, as ``pretrain`` defines)."""

    pairs: list[Path] = Field(default_factory=list, description="Left empty: the built data folder fills it in.")
    out: Path = Field(description="Folder of the runs: the pairs of DATA train in OUT/<DATA's name>.")

    def run_folder(self, data: Path) -> Path:
        return self.out / Path(data).resolve().name

    def for_pairs(self, data: Path) -> PretrainConfig:
        settings = self.model_dump(exclude={"pairs", "out"})
        return PretrainConfig(**settings, pairs=[Path(data).resolve()], out=self.run_folder(data))

    def trigger_parameters(self) -> dict:
        """The ``pretrain`` form, filled in from a ``blipdiff.pairs.built`` event."""
        settings = self.model_dump(mode="json", exclude={"pairs", "out"})
        return {"parameters": {**settings, "pairs": ["{{ event.payload.data }}"],
                               "out": f"{self.out}/{{{{ event.resource['prefect.resource.name'] }}}}"}}


class CheckpointEvaluation(EvalSettings):
    """The evaluation a checkpoint gets: the protocol (a cheap tier: a few subjects, prompts and images) and
    where the evaluations go; the checkpoint comes from the event."""

    eval_root: Path = Field(description="Folder of the evaluations: one folder per run, history.parquet.")

    def of(self, checkpoint: str) -> DreamBenchEvalParameters:
        return DreamBenchEvalParameters(**self.model_dump(), model=checkpoint)

    def trigger_parameters(self) -> dict:
        """The ``dreambench_eval`` form, filled in from a ``blipdiff.pretrain.checkpoint.written`` event."""
        return {"parameters": {**self.model_dump(mode="json"), "model": "{{ event.payload.checkpoint }}"}}


class ChainConfig(BaseModel):
    """What the served chain's triggers start (``blipdiff serve --chain FILE``, a JSON of this model)."""

    model_config = ConfigDict(extra="forbid")

    pretrain: PretrainPlan | None = Field(None, description="The pre-training a finished build starts; none: no trigger.")
    evaluation: CheckpointEvaluation | None = Field(
        None, description="The evaluation every K-th checkpoint gets; none: no trigger.")
    evaluate_every: int = Field(1, ge=1, description="K: evaluate the K-th, 2K-th, ... checkpoint of each run.")
    pretrain_after_build: bool = Field(True, description="Turn the build → pretrain trigger on or off.")
    evaluate_checkpoints: bool = Field(True, description="Turn the checkpoint → dreambench_eval trigger on or off.")


class PipelineParameters(BaseModel):
    """The whole chain as one run; the Prefect UI renders it as one form."""

    model_config = ConfigDict(extra="forbid")

    build: BuildPairsParameters
    pretrain: PretrainPlan
    evaluation: CheckpointEvaluation | None = Field(None, description="Evaluate the run's newest checkpoint; none: don't.")


@flow(name="blip_diffusion_pipeline", log_prints=True)
def blip_diffusion_pipeline(parameters: PipelineParameters) -> dict:
    """Pairs → latents → pre-training → evaluation, each a subflow; a failed or regressed stage fails the run."""
    logger = get_run_logger()
    data = parameters.build.data
    built = build_pairs_flow(parameters.build)
    if built["pairs"] == 0:
        raise ValueError(f"the build made no pairs in {data}: nothing to train on")
    training = parameters.pretrain.for_pairs(data)
    latents = encode_latents_flow(EncodeLatentsConfig(pairs=data, model=training.latent_model(),
                                                      resolution=training.resolution, actors=training.latent_actors))
    logger.info("latents: %s encoded, %s cached in %s", latents["encoded"], latents["cached"], latents["folder"])
    trained = pretrain_flow(training)
    result = {"pairs": built, "latents": latents, "pretrain": trained}
    if parameters.evaluation is not None:
        # A regressed evaluation ends Failed, which fails this run too.
        result["evaluation"] = dreambench_eval_flow(parameters.evaluation.of(trained["checkpoint"]))
    return result

