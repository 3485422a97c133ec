"""The `blipdiff` command. Each family of commands has its module; heavy libraries are imported inside the
commands that need them, so `blipdiff --help` stays quick."""

from __future__ import annotations

import typer
from blipdiff.infra.cli import data, evaluation, generation, orchestration, training

app = typer.Typer(
    name="blipdiff",
    help="BLIP-Diffusion's data pipeline, training and DreamBench evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One table, in the order `blipdiff --help` lists them: the data, then generation, training, evaluation and
# orchestration (the family modules define plain functions, so none of them imports this package's app).
COMMANDS = (
    ("filter", data.filter_command),
    ("fetch", data.fetch_command),
    ("build", data.build_command),
    ("matte", data.matte_command),
    ("catalog", data.catalog_command),
    ("app", data.app_command),
    ("generate", generation.generate_command),
    ("edit", generation.edit_command),
    ("interpolate", generation.interpolate_command),
    ("finetune", training.finetune_command),
    ("dreambooth", training.dreambooth_command),
    ("encode-latents", training.encode_latents_command),
    ("pretrain", training.pretrain_command),
    ("score", evaluation.score_command),
    ("eval", evaluation.eval_command),
    ("compare", evaluation.compare_command),
    ("serve", orchestration.serve_command),
    ("pin-baseline", evaluation.pin_baseline_command),
    ("server", orchestration.server_command),
    ("demo", orchestration.demo_command),
)
for name, command in COMMANDS:
    app.command(name)(command)
