"""Shared rich consoles, the progress bar every long clipforge job shows, and plain-text printing.

Everything a user wrote (paths, captions, queries, error messages that quote them) is printed as plain text:
rich would read ``album[summer]/x.jpg`` or ``[optimizer]`` as markup and eat the brackets. ``say``, ``warn`` and
``fail`` print such text; rich markup is only ever used in clipforge's own fixed labels.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
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

from clipforge._util.fileio import printable

console = Console(emoji=False)  # ":cat:" in a path or an error stays text
error_console = Console(stderr=True, emoji=False)


def say(text: str) -> None:
    """One line (or more) of plain text on stdout: no markup, no highlighting, no wrapping inside words."""
    console.print(printable(text), markup=False, highlight=False, soft_wrap=True)


def warn(label: str, text: str) -> None:
    """``label:`` in yellow, then ``text`` as plain text, on stderr (e.g. a skipped file)."""
    error_console.print(f"[yellow]{label}:[/] {escape(printable(text))}", highlight=False, soft_wrap=True)


def fail(text: str) -> None:
    """``error:`` in red, then ``text`` as plain text, on stderr: the one line of a failed command."""
    error_console.print(f"[bold red]error:[/] {escape(printable(text))}", highlight=False, soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second, with the unit given as the task field ``unit`` (default "it")."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"- {unit}/s", style="cyan")


def bar_is_hidden() -> bool:
    """True when the progress bar cannot draw (stderr is a file or a pipe): long jobs then log plain lines."""
    return not error_console.is_terminal


def log_line(text: str) -> None:
    """One plain line on stderr, beside (or instead of) the progress bar."""
    error_console.print(printable(text), markup=False, highlight=False, soft_wrap=True)


class _Progress(Progress):
    """A bar that disappears when the work fails: the command ends on its one error line, not a half-drawn bar."""

    def __exit__(self, exc_type, exc_value, traceback) -> None:  # noqa: ANN001
        if exc_type is not None:
            self.live.transient = True
            for task in list(self.task_ids):
                self.remove_task(task)
        super().__exit__(exc_type, exc_value, traceback)


def progress_bar(disable: bool = False, transient: bool = False) -> Progress:
    """Counts, items/s and ETA, drawn on stderr so stdout stays parseable.

    Redrawn twice a second: rich's default (10/s) takes the GIL often enough to cost a CPU training loop
    a few per cent.
    """
    return _Progress(
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
