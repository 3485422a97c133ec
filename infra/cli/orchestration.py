"""The orchestration commands: the Prefect deployments and server, and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from blipdiff.infra.cli.common import fail


def serve_command(
    data: Annotated[Path, typer.Option(help="Data folder; Prefect's state lives in DATA/prefect without PREFECT_API_URL.")]
    = Path("blipdiff-data"),
    parameters: Annotated[
        Path | None, typer.Option(help="JSON file of build_pairs parameters: the deployment's defaults.")
    ] = None,
    cron: Annotated[str | None, typer.Option(help="Schedule of the build_pairs deployment (cron).")] = None,
    eval_parameters: Annotated[Path | None, typer.Option(
        help="JSON file of dreambench_eval parameters (model or training_run, dreambench, eval_root, the protocol): "
             "the deployment's defaults, which its schedule runs.")] = None,
    eval_cron: Annotated[str | None, typer.Option(help='Nightly schedule of dreambench_eval (cron), e.g. "0 2 * * *".')]
    = None,
    timezone: Annotated[str, typer.Option(help="Time zone of the schedules (IANA name, e.g. Europe/Paris).")] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "blipdiff",
    chain: Annotated[Path | None, typer.Option(
        help="JSON file of the chain (blipdiff.flows.chain.ChainConfig): what a finished build and every K-th "
             "checkpoint start. Without it, no triggers.")] = None,
    work_pool: Annotated[str | None, typer.Option(
        help="Work pool of the GPU stages (pretrain, dreambench_eval, latents, the pipeline, a BLIP-2/CLIPSeg "
             "build), run by `prefect worker start --pool POOL` on a GPU machine; the rest is served here.")] = None,
    gpu_slots: Annotated[int, typer.Option(min=1, help="Slots of the GPU concurrency limit blipdiff-gpu: GPU stages "
                                                       "that may run at once.")] = 1,
) -> None:
    """Serve the deployments of the flows (build_pairs, pretrain, dreambench_eval, encode_latents,
    blip_diffusion_pipeline), with the chain's triggers, so that the Prefect UI, events and schedules run them."""
    import zoneinfo

    from blipdiff.infra.prefect_home import use_project_prefect_home
    from pydantic import ValidationError

    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as error:
        raise fail(f"--timezone {timezone}: not an IANA time zone") from error
    if eval_cron is not None and eval_parameters is None:
        raise fail("--eval-cron needs --eval-parameters: a scheduled run has no one to fill in its form")
    use_project_prefect_home(data)

    from blipdiff.flows.build_pairs import BuildPairsParameters
    from blipdiff.flows.deployments import read_chain, serve_chain
    from blipdiff.flows.dreambench_eval import DreamBenchEvalParameters
    from prefect.schedules import Cron

    def defaults(path: Path | None, model) -> dict | None:
        if path is None:
            return None
        try:
            return {"parameters": model.model_validate_json(path.read_text()).model_dump(mode="json")}
        except (OSError, ValidationError) as error:
            raise fail(f"cannot use {path}: {error}") from error

    def schedule(expression: str | None) -> Cron | None:
        return Cron(expression, timezone=timezone) if expression else None

    build_defaults, eval_defaults = defaults(parameters, BuildPairsParameters), defaults(eval_parameters,
                                                                                          DreamBenchEvalParameters)
    try:
        chained = read_chain(chain)
    except (OSError, ValidationError) as error:
        raise fail(f"cannot use {chain}: {error}") from error
    # Pre-training has no defaults to give: its form asks for the pairs, the starting checkpoint and the run folder
    # (the chain's trigger fills them in from the build).
    serve_chain(name, chained, gpu_slots, work_pool, build_defaults=build_defaults, cron=schedule(cron),
                eval_defaults=eval_defaults, eval_cron=schedule(eval_cron))


def server_command(
    data: Annotated[Path, typer.Option(help="Data folder; Prefect's state lives in DATA/prefect without PREFECT_API_URL.")]
    = Path("blipdiff-data"),
    port: Annotated[int, typer.Option(help="Port of the Prefect UI and API on 127.0.0.1.")] = 4200,
) -> None:
    """Start the Prefect UI and API locally on 127.0.0.1."""
    import os
    import sys

    from blipdiff.infra.prefect_home import use_project_prefect_home

    use_project_prefect_home(data)
    # The UI calls the API at this address; Prefect's default assumes port 4200.
    os.environ.setdefault("PREFECT_UI_API_URL", f"http://127.0.0.1:{port}/api")
    prefect = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    os.execv(sys.executable, prefect)


def demo_command(
    out: Annotated[Path, typer.Option(help="Folder for the demo's outputs.")] = Path("blipdiff-demo"),
    dataset: Annotated[
        str, typer.Option(help="FiftyOne dataset that catalogues the pairs (made anew by every demo run); the "
                               "evaluations go to DATASET-dreambench.")
    ] = "blipdiff-demo",
) -> None:
    """The whole chain on the bundled sample, no weights, no network: build_pairs, then, started by the chain's
    triggers, a short pretrain of a small random BLIP-Diffusion and dreambench_eval of its checkpoints on a small
    benchmark in DreamBench's layout."""
    from blipdiff.infra.prefect_home import use_project_prefect_home

    home = use_project_prefect_home(out)

    from blipdiff.infra.demo import run_demo

    run_demo(out, dataset, log=typer.echo)
    if home is not None:
        typer.echo(f"Prefect runs are kept in {home}: `blipdiff server --data {out}`, then open http://127.0.0.1:4200")
