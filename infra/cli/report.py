"""The commands' terminal output: stage summaries as tables, progress bars with rates and ETAs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from blipdiff.datasets.build import BuildSummary
    from blipdiff.datasets.catalog import CatalogSummary
    from blipdiff.datasets.fetch import FetchSummary
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


class ItemRateColumn(ProgressColumn):
    """Items per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-/s" if speed is None else f"{speed:,.1f}/s", style="progress.data.speed")


Result = TypeVar("Result")


def run_with_progress(label: str, work: Callable[[Callable[[int, int], None]], Result]) -> Result:
    """Run ``work(progress)`` under a bar with count, rate and ETA; ``progress(done, total)`` moves it."""
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), ItemRateColumn(), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task(label, total=None)
        return work(lambda done, total: bar.update(task, completed=done, total=total))


@contextlib.contextmanager
def training_progress(steps: int) -> Iterator[Callable[[dict], None]]:
    """A bar of training steps with the latest loss, samples/s and the ETA the trainer estimates; the
    callback takes the trainer's progress records (``step``, ``loss``, ``samples_per_s``, ``eta_seconds``)."""
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns) as bar:
        task = bar.add_task("training", total=steps, status="starting")

        def update(progress: dict) -> None:
            eta = progress.get("eta_seconds")
            eta_text = "" if eta is None else f", ETA {int(eta) // 3600}:{int(eta) % 3600 // 60:02d}:{int(eta) % 60:02d}"
            bar.update(task, completed=progress["step"], status=f"loss {progress['loss']:.4f}, "
                       f"{progress['samples_per_s']:.1f} samples/s{eta_text}")

        yield update


def print_fetch_summary(summary: FetchSummary, console: Console | None = None) -> None:
    table = Table(title="Fetch")
    table.add_column("outcome")
    table.add_column("images", justify="right")
    table.add_row("fetched", f"{summary.fetched:,}")
    table.add_row("skipped (already present)", f"{summary.skipped:,}")
    for reason, count in summary.reasons().most_common():
        table.add_row(f"rejected, {reason}", f"{count:,}")
    (console or Console()).print(table)


def print_build_summary(summary: BuildSummary, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="Build")
    table.add_column("outcome")
    table.add_column("subjects", justify="right")
    table.add_row("pairs", f"{summary.pairs:,}")
    table.add_row("skipped (done by an earlier run)", f"{summary.skipped:,}")
    for reason, count in summary.rejects.most_common():
        table.add_row(f"rejected, {reason}", f"{count:,}")
    console.print(table)
    stages = Table(title="Mean seconds per pair and stage")
    for stage in summary.seconds_per_stage:
        stages.add_column(stage, justify="right")
    stages.add_row(*(f"{seconds:.3f}" for seconds in summary.seconds_per_stage.values()))
    console.print(stages)


def print_catalog_summary(summary: CatalogSummary, console: Console | None = None) -> None:
    table = Table(title=f"Catalog: FiftyOne dataset {summary.dataset!r}")
    table.add_column("groups")
    table.add_column("count", justify="right")
    table.add_row("pairs", f"{summary.pairs:,}")
    table.add_row("rejected subjects", f"{summary.rejects:,}")
    table.add_row("added by this run", f"{summary.added:,}")
    table.add_row("replaced or removed", f"{summary.removed:,}")
    console = console or Console()
    console.print(table)
    console.print(f"saved views: {', '.join(summary.saved_views)}")
    console.print(f"open it: {summary.app_command()}")
