"""Shared rich consoles and the progress bar every long clipforge job shows."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console()
error_console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, with the unit given as the task field ``unit`` (default "it")."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"- {unit}/s", style="cyan")


def progress_bar(disable: bool = False, transient: bool = False) -> Progress:
    """Counts, items/s and ETA, drawn on stderr so stdout stays parseable.

    Redrawn twice a second: rich's default (10/s) takes the GIL often enough to cost a CPU training loop
    a few per cent.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=error_console,
        disable=disable,
        transient=transient,
        refresh_per_second=2,
    )
