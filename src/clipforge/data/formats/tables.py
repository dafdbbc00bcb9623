"""THE table reader: CSV, TSV, parquet and JSONL files with one image per row.

The layouts are open_clip's ``--dataset-type csv`` (an image path column and a caption column; its
defaults ``filepath``/``title`` are among the auto-detected names), img2dataset's input and output
tables, and Hugging Face datasets exported to parquet (an ``Image`` feature is a ``{"bytes", "path"}``
struct). An image cell holds a path (relative to a root, by default the table's folder), encoded image
bytes (a binary column) or such a struct; the other column read is a caption (as text) or a class label
(as stored: class ids or class names).

TSV files are read as img2dataset and CC3M write them: tab-separated with no quoting, so a ``"`` in a
caption is just a character (``"Big" sale, 2 for 1`` stays as written). CSV follows RFC 4180 quoting.
Every problem is one line naming the file and the column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from clipforge.data.formats.samples import decode_caption
from clipforge.errors import ConfigError, InputError, one_line

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl")
IMAGE_COLUMNS = ("image", "path", "filepath")
CAPTION_COLUMNS = ("caption", "text", "title")


@dataclass(frozen=True)
class Table:
    """The image column and one more column (captions or class labels) of a table, one entry per row.

    ``images`` holds path strings, encoded bytes (a binary column) or ``{"bytes", "path"}`` structs.
    """

    path: Path
    image_column: str
    images: pa.Array
    value_column: str
    values: pa.Array  # captions as text; labels as stored

    def __len__(self) -> int:
        return len(self.images)

    @property
    def holds_paths(self) -> bool:
        """True when every image cell is a path (a text column)."""
        return pa.types.is_string(self.images.type)

    def image_path(self, row: int) -> str | None:
        """The path written in the row's image cell, None when it is blank or holds only bytes."""
        value = self.images[row].as_py()
        if isinstance(value, dict):
            value = value.get("path")
        return value if isinstance(value, str) and value.strip() else None

    def image(self, row: int, root: Path) -> Path | bytes | None:
        """The row's image: its encoded bytes, or its file (a relative path resolved against ``root``);
        None when the cell is empty."""
        value = self.images[row].as_py()
        if isinstance(value, dict) and value.get("bytes"):
            return value["bytes"]
        if isinstance(value, bytes):
            return value
        path = self.image_path(row)
        return None if path is None else root / path

    def caption(self, row: int, key: str) -> str:
        """The row's caption (``decode_caption``: stripped, never blank), errors naming ``key``."""
        return decode_caption(self.values[row].as_py(), key, f"no {self.value_column!r} value")


def read_caption_table(path: Path, image_column: str | None = None, caption_column: str | None = None) -> Table:
    """Images and captions; a column given as ``None`` is the first of ``IMAGE_COLUMNS``/``CAPTION_COLUMNS`` present."""
    return _read(path, image_column, (caption_column, CAPTION_COLUMNS, "caption"), value_is_text=True)


def read_label_table(path: Path, image_column: str | None = None, label_column: str = "label") -> Table:
    """Images and class labels (ids or names, as the file stores them)."""
    return _read(path, image_column, (label_column, (), "label"), value_is_text=False)


def _read(path: Path, image_column: str | None, value: tuple[str | None, tuple[str, ...], str], value_is_text: bool) -> Table:
    """The image column and the ``value`` column (wanted name or None, names to look for, role)."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ConfigError(f"{path}: unknown table type {suffix!r} (expected one of {', '.join(TABLE_SUFFIXES)})")
    if not path.is_file():
        raise InputError(f"{path}: no such file")

    def pick(names: list[str]) -> list[str]:
        return [_pick(path, names, image_column, IMAGE_COLUMNS, "image"), _pick(path, names, *value)]

    try:
        table, (image_name, value_name) = _read_columns(path, suffix, pick, value_is_text)
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"{path}: cannot parse manifest ({one_line(error)})") from error
    images = table.column(image_name).combine_chunks()
    if not _holds_encoded_images(images.type):
        images = _as_text(path, images, image_name)
    values = table.column(value_name).combine_chunks()
    return Table(path, image_name, images, value_name, _as_text(path, values, value_name) if value_is_text else values)


def _read_columns(
    path: Path, suffix: str, pick: Callable[[list[str]], list[str]], value_is_text: bool
) -> tuple[pa.Table, list[str]]:
    """The image and value columns ``pick`` chooses from the table's column names, and their names. In
    CSV/TSV the image column (and the value column when ``value_is_text``) is read as text, the other
    with pyarrow's type inference."""
    if suffix == ".parquet":
        names = pick(pq.read_schema(path).names)
        return pq.read_table(path, columns=list(dict.fromkeys(names))), names
    if suffix == ".jsonl":
        table = pa_json.read_json(path)
        names = pick(table.column_names)
        return table.select(list(dict.fromkeys(names))), names
    # img2dataset's and CC3M's TSV files do not quote fields: a '"' inside a caption is just a character.
    parse = pa_csv.ParseOptions(delimiter="\t", quote_char=False) if suffix == ".tsv" else pa_csv.ParseOptions()
    names = pick(pa_csv.open_csv(path, parse_options=parse).schema.names)
    text = names if value_is_text else names[:1]
    convert = pa_csv.ConvertOptions(include_columns=list(dict.fromkeys(names)), column_types=dict.fromkeys(text, pa.string()))
    return pa_csv.read_csv(path, parse_options=parse, convert_options=convert), names


def _pick(path: Path, names: list[str], wanted: str | None, candidates: tuple[str, ...], role: str) -> str:
    if wanted is not None:
        if wanted in names:
            return wanted
        raise ConfigError(f"{path}: no {role} column {wanted!r}; found columns: {', '.join(names)}")
    for name in candidates:
        if name in names:
            return name
    raise ConfigError(
        f"{path}: no {role} column (looked for {', '.join(candidates)}; rename yours to one of them, or name it with "
        f"--{role}-column where the command has that option); "
        f"found columns: {', '.join(names)}"
    )


def _holds_encoded_images(kind: pa.DataType) -> bool:
    """Binary columns, and Hugging Face datasets' image structs (a ``bytes`` or ``path`` field)."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return pa.types.is_struct(kind) and any(kind.field(i).name in ("bytes", "path") for i in range(kind.num_fields))


def _as_text(path: Path, column: pa.Array, name: str) -> pa.Array:
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise ConfigError(f"{path}: column {name!r} holds {column.type}, not text") from error
