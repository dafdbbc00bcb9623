"""Shared helpers for the benchmark scripts: interleaved timing, medians, the table, the JSON line.

Every benchmark prints a human-readable table and, as its very last line, one JSON object with its
figures, so other tools can read the numbers (the convention of docs/architecture.md). Machines are noisy: variants are timed
in turn (A, B, C, A, B, C, ...) and medians are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

TABLE_WIDTH = 140


def parser(description: str) -> argparse.ArgumentParser:
    arguments = argparse.ArgumentParser(description=description)
    arguments.add_argument("--quick", action="store_true", help="a shorter run that still prints every figure")
    return arguments


def interleaved_medians(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each variant, timing the variants in turn to share the machine's noise."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A table on stdout (for benchmarks that print several before their JSON line)."""
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*[f"{value:,.3f}" if isinstance(value, float) else str(value) for value in row])
    Console(width=None if sys.stdout.isatty() else TABLE_WIDTH).print(table)  # piped: wider than rich's 80 columns


def report(title: str, columns: list[str], rows: list[list[Any]], figures: dict[str, Any]) -> None:
    """The table on stdout (none without rows: e.g. sections without a headline figure), then the JSON line
    (always the last line)."""
    if rows:
        print_table(title, columns, rows)
    print(json.dumps(figures), flush=True)
