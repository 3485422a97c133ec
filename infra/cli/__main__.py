"""`python -m blipdiff.infra.cli`, the same as the `blipdiff` script."""

from blipdiff.infra.cli import app

app()
