"""The one table style of the command line: readable at 80 columns.

Compact (a rule under the header, one space between columns, no outer border) and never cut: a cell too
wide for the terminal folds onto the next line instead of ending in an ellipsis.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table


def table(*headers: str, title: str | None = None, **settings: Any) -> Table:
    """A rich ``Table`` with ``headers`` as folding columns (``settings`` go to ``Table``)."""
    made = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, **settings)
    for header in headers:
        made.add_column(header, overflow="fold")
    return made
