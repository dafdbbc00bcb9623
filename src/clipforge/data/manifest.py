"""Where samples live: tabular manifests (CSV, TSV, parquet, JSONL) and tar shard offset indexes.

Tabular manifests follow open_clip's ``--dataset-type csv`` (image path and caption columns; its
defaults ``filepath``/``title`` are among the auto-detected names) and img2dataset's input formats.

A tar offset index makes a webdataset shard (img2dataset layout, ``{key}.jpg`` + ``{key}.txt``;
research/data-retrieval.md §4) randomly accessible: the headers are scanned once with ``tarfile``,
the byte offset and size of each sample's image and caption are kept, and a sample is then read with
one seek. Files are grouped into samples by webdataset's rule (``webdataset.tariterators.base_plus_ext``):
the key is the path up to the first dot of the file's basename, the field is the rest. The index is
cached next to its shard as a hidden parquet file, valid while the shard's size and mtime are unchanged.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from clipforge._util.fileio import atomic_path
from clipforge.errors import ConfigError, InputError, one_line

MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl")
IMAGE_COLUMNS = ("image", "path", "filepath")
CAPTION_COLUMNS = ("caption", "text", "title")

SHARD_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
SHARD_CAPTION_FIELD = "txt"
OFFSET_INDEX_VERSION = "1"
NO_MEMBER = -1  # offset of a field the sample does not have

_OFFSET_COLUMNS = ("image_offsets", "image_sizes", "caption_offsets", "caption_sizes")
_KEY_AND_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


@dataclass(frozen=True)
class ManifestColumns:
    """The image and caption column of a manifest, one entry per sample.

    ``images`` holds path strings, or encoded image bytes when the column is binary.
    """

    images: pa.Array
    captions: pa.Array
    image_column: str
    caption_column: str


def read_manifest(path: Path, image_column: str | None = None, caption_column: str | None = None) -> ManifestColumns:
    """The two columns of a manifest; ``None`` picks the first of ``IMAGE_COLUMNS``/``CAPTION_COLUMNS`` present."""
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ConfigError(f"{path}: unknown manifest type {suffix!r} (expected one of {', '.join(MANIFEST_SUFFIXES)})")
    if not path.is_file():
        raise InputError(f"{path}: no such manifest file")
    try:
        table = _read_table(path, suffix, lambda names: _pick_columns(path, names, image_column, caption_column))
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"{path}: cannot parse manifest ({one_line(error)})") from error
    image, caption = table.column_names[0], table.column_names[-1]
    images = table.column(image).combine_chunks()
    if not (pa.types.is_binary(images.type) or pa.types.is_large_binary(images.type)):
        images = _as_text(path, images, image)
    return ManifestColumns(images, _as_text(path, table.column(caption).combine_chunks(), caption), image, caption)


def _read_table(path: Path, suffix: str, pick: Callable[[list[str]], list[str]]) -> pa.Table:
    """Only the columns ``pick`` chooses from the manifest's column names, in the order it gives."""
    if suffix == ".parquet":
        return pq.read_table(path, columns=pick(pq.read_schema(path).names))
    if suffix == ".jsonl":
        table = pa_json.read_json(path)
        return table.select(pick(table.column_names))
    # TSV files (img2dataset, CC3M) do not quote fields: a '"' inside a caption is just a character.
    parse = pa_csv.ParseOptions(delimiter="\t", quote_char=False) if suffix == ".tsv" else pa_csv.ParseOptions()
    columns = pick(pa_csv.open_csv(path, parse_options=parse).schema.names)
    convert = pa_csv.ConvertOptions(include_columns=columns, column_types=dict.fromkeys(columns, pa.string()))
    return pa_csv.read_csv(path, parse_options=parse, convert_options=convert)


def _pick_columns(path: Path, names: list[str], image_column: str | None, caption_column: str | None) -> list[str]:
    image = _pick_column(path, names, image_column, IMAGE_COLUMNS, "image")
    caption = _pick_column(path, names, caption_column, CAPTION_COLUMNS, "caption")
    return [image, caption] if image != caption else [image]


def _pick_column(path: Path, names: list[str], wanted: str | None, candidates: tuple[str, ...], role: str) -> str:
    if wanted is not None:
        if wanted in names:
            return wanted
        raise ConfigError(f"{path}: no {role} column {wanted!r}; found columns: {', '.join(names)}")
    for name in candidates:
        if name in names:
            return name
    raise ConfigError(
        f"{path}: no {role} column (looked for {', '.join(candidates)}; name it with {role}_column); "
        f"found columns: {', '.join(names)}"
    )


def _as_text(path: Path, column: pa.Array, name: str) -> pa.Array:
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise ConfigError(f"{path}: column {name!r} holds {column.type}, not text") from error


@dataclass(frozen=True)
class ShardOffsets:
    """Where each sample of one tar shard is: key, and byte offset and size of its image and caption."""

    keys: list[str]
    image_offsets: np.ndarray  # int64, NO_MEMBER when the sample has no image
    image_sizes: np.ndarray
    caption_offsets: np.ndarray  # int64, NO_MEMBER when the sample has no caption
    caption_sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


def offset_index_path(shard: Path) -> Path:
    """The cache file of a shard's offset index: hidden, so ``*.parquet`` globs over img2dataset output skip it."""
    return shard.with_name(f".{shard.name}.offsets.parquet")


def shard_offsets(shard: Path) -> ShardOffsets:
    """The offset index of ``shard``: from its cache when the shard's size and mtime match, else scanned and cached."""
    try:
        stat = shard.stat()
    except FileNotFoundError as error:
        raise InputError(f"{shard}: no such shard") from error
    stamp = {b"version": OFFSET_INDEX_VERSION.encode(), b"size": str(stat.st_size).encode(),
             b"mtime_ns": str(stat.st_mtime_ns).encode()}
    cache = offset_index_path(shard)
    cached = _read_cache(cache, stamp)
    if cached is not None:
        return cached
    offsets = scan_tar(shard)
    _write_cache(cache, offsets, stamp)
    return offsets


def scan_tar(shard: Path) -> ShardOffsets:
    """Read every member header of an uncompressed tar and group image and caption members by sample key."""
    if shard.stat().st_size == 0:
        return _offsets_from_rows({})
    rows: dict[str, list[int]] = {}  # key -> [image offset, image size, caption offset, caption size]
    try:
        with tarfile.open(shard, mode="r:") as archive:
            for member in archive:
                match = _KEY_AND_FIELD.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, field = match.group(1), match.group(2).lower()
                slot = 0 if field in SHARD_IMAGE_FIELDS else 2 if field == SHARD_CAPTION_FIELD else None
                if slot is None:
                    continue
                row = rows.setdefault(key, [NO_MEMBER, 0, NO_MEMBER, 0])
                if row[slot] == NO_MEMBER:
                    row[slot], row[slot + 1] = member.offset_data, member.size
    except (tarfile.TarError, OSError) as error:
        raise InputError(f"{shard}: not a readable uncompressed tar shard ({one_line(error)})") from error
    return _offsets_from_rows(rows)


def _offsets_from_rows(rows: dict[str, list[int]]) -> ShardOffsets:
    table = np.array(list(rows.values()), dtype=np.int64).reshape(len(rows), 4)
    return ShardOffsets(list(rows), table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy(), table[:, 3].copy())


def _read_cache(cache: Path, stamp: dict[bytes, bytes]) -> ShardOffsets | None:
    try:
        table = pq.read_table(cache)
    except (OSError, pa.ArrowException):
        return None
    metadata = table.schema.metadata or {}
    if any(metadata.get(name) != value for name, value in stamp.items()):
        return None
    columns = {name: table.column(name).to_numpy() for name in _OFFSET_COLUMNS}
    return ShardOffsets(keys=table.column("keys").to_pylist(), **columns)


def _write_cache(cache: Path, offsets: ShardOffsets, stamp: dict[bytes, bytes]) -> None:
    """Best effort: a read-only shard folder only means the index is rebuilt next time."""
    columns = {"keys": pa.array(offsets.keys, pa.string())}
    columns |= {name: pa.array(getattr(offsets, name), pa.int64()) for name in _OFFSET_COLUMNS}
    with suppress(OSError), atomic_path(cache) as tmp:
        pq.write_table(pa.table(columns).replace_schema_metadata(stamp), tmp)


def read_member(shard: Path, offset: int, size: int) -> bytes | None:
    """``size`` bytes at ``offset`` of ``shard``; None when the file ends before them (truncated shard)."""
    with open(shard, "rb") as stream:
        stream.seek(offset)
        data = stream.read(size)
    return data if len(data) == size else None

