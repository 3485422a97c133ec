"""Terminal tables for stage summaries."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from blipdiff.datasets.openimages import Funnel


def print_funnel(funnel: Funnel, console: Console | None = None) -> None:
    table = Table(title=f"Subject filter: {funnel.rows_read:,} rows, {funnel.images_read:,} images")
    table.add_column("rule")
    table.add_column("boxes removed", justify="right")
    table.add_column("boxes left", justify="right")
    for rule, removed, left in funnel.rows():
        table.add_row(rule, f"{removed:,}", f"{left:,}")
    table.add_row("subjects", "", f"{funnel.subjects:,}", style="bold")
    (console or Console()).print(table)
