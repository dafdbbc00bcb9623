"""File names that are not valid UTF-8, kept losslessly in the tables clipforge writes.

A Linux file name is any bytes but ``/`` and NUL; Python hands one that is not valid UTF-8 over as a ``str``
with lone surrogates (``os.fsdecode``'s ``surrogateescape``), which Arrow cannot store in a string column.
So a table's name column ``NAME`` holds the name's *text*, each undecodable byte written ``\\xNN``
(``clipforge._util.fileio.printable``: ``café`` saved in Latin-1 reads ``caf\\xe9``), and, only when some name needs it, a binary
column ``NAME_bytes`` holds the exact bytes of those names (null for the others). ``restore_names`` reads a
row back to the names Python's ``open`` accepts. Valid UTF-8 names, the usual case, are stored as they are
and add no column.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from clipforge._util.fileio import printable


def name_bytes(name: str) -> bytes | None:
    """The exact bytes of a name that is not valid UTF-8, or None for one that is."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name)
    return None


def table_from_rows(rows: Sequence[dict[str, Any]], names: Iterable[str] = ()) -> pa.Table:
    """A table of ``rows`` (keys missing in a row are null); the ``names`` columns stored as the module says."""
    names = tuple(names)
    arrays: dict[str, pa.Array] = {}
    for key in dict.fromkeys(key for row in rows for key in row):
        values = [row.get(key) for row in rows]
        if key not in names:
            arrays[key] = pa.array(values)
            continue
        arrays[key] = pa.array([printable(value) if isinstance(value, str) else value for value in values], pa.string())
        raw = [name_bytes(value) if isinstance(value, str) else None for value in values]
        if any(item is not None for item in raw):
            arrays[f"{key}_bytes"] = pa.array(raw, pa.binary())
    return pa.table(arrays)


def restore_names(row: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """A row read from such a table with its ``names`` as Python file names again (``NAME_bytes`` dropped)."""
    restored = {key: value for key, value in row.items() if not (key.endswith("_bytes") and key.removesuffix("_bytes") in names)}
    for key in names:
        raw = row.get(f"{key}_bytes")
        if raw is not None:
            restored[key] = os.fsdecode(raw)
    return restored
