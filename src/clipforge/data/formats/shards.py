"""THE webdataset shard reader: tar shards made randomly accessible by an index of their members.

A shard holds samples in webdataset's layout (what img2dataset writes: ``{key}.jpg``, ``{key}.txt``,
``{key}.json``; CLIP_benchmark's ``wds/`` sets add ``{key}.cls``; rom1504/img2dataset's webdataset writer).
Members are grouped into samples by webdataset's key rule (``webdataset.tariterators.base_plus_ext``):
the key is the path up to the first dot of the member's basename, the field is the rest, lowercased
here (``dir.v2/a.syn.json`` is field ``syn.json`` of sample ``dir.v2/a``). Members without a dot are
ignored, as webdataset does.

The headers are scanned once with ``tarfile`` and the byte offset and size of every member of every
sample are kept, so any field (image, ``.txt``, ``.cls``, ``.json``) is then read with one seek. The
index is cached next to its shard as a hidden parquet file (``.{shard}.offsets.parquet``), valid while
the shard's size and mtime and ``OFFSET_INDEX_VERSION`` are unchanged. ``ShardMember`` names one
member's bytes; it is small and picklable, so decoding workers receive it instead of the bytes.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge._util.fileio import atomic_path
from clipforge._util.imageio import IMAGE_EXTENSIONS
from clipforge.data.formats.samples import TRUNCATED_SHARD, SampleError, decode_caption
from clipforge.errors import InputError, one_line

IMAGE_FIELDS = tuple(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
CAPTION_FIELD = "txt"
OFFSET_INDEX_VERSION = "2"  # 1: image and caption members only
INDEX_THREADS = 8  # shard indexes read or built at once
SOURCE_LIST_SEPARATOR = "::"  # open_clip's separator for several data sources

_KEY_AND_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


@dataclass(frozen=True)
class ShardMember:
    """The bytes of one member of a tar shard: ``size`` bytes at ``offset`` of the shard ``path``."""

    path: str
    key: str  # the sample's key
    offset: int
    size: int

    @property
    def label(self) -> str:
        """How messages name it: ``<shard>:<sample key>``."""
        return f"{self.path}:{self.key}"

    def read(self) -> bytes:
        """The member's bytes; ``InputError`` naming ``label`` when the shard is unreadable or shorter."""
        try:
            with open(self.path, "rb") as stream:
                stream.seek(self.offset)
                data = stream.read(self.size)
        except OSError as error:
            raise InputError(f"{self.label}: cannot read ({one_line(error)})") from None
        if len(data) != self.size:
            raise SampleError(self.label, TRUNCATED_SHARD, f"the file ends before byte {self.offset + self.size}")
        return data


@dataclass(frozen=True)
class ShardIndex:
    """The samples of one shard, in order of first appearance, and their members in tar order.

    The members of sample ``row`` are entries ``starts[row]:starts[row + 1]`` of ``field_codes`` (into
    ``field_names``), ``offsets`` and ``sizes``: a few numpy arrays, small even for shards of many samples.
    """

    path: Path
    keys: list[str]
    starts: np.ndarray  # int64 [samples + 1]
    field_names: list[str]
    field_codes: np.ndarray  # int32, one per member
    offsets: np.ndarray  # int64, first byte of each member's data
    sizes: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.keys)

    def _codes(self, fields: Collection[str]) -> list[int]:
        return [code for code, name in enumerate(self.field_names) if name in fields]

    def _first(self, row: int, fields: Collection[str]) -> ShardMember | None:
        codes = self._codes(fields)
        start, stop = int(self.starts[row]), int(self.starts[row + 1])
        entry = next((entry for entry in range(start, stop) if self.field_codes[entry] in codes), None)
        if entry is None:
            return None
        return ShardMember(str(self.path), self.keys[row], int(self.offsets[entry]), int(self.sizes[entry]))

    def member(self, row: int, field: str) -> ShardMember | None:
        """Field ``field`` of sample ``row`` (the first such member), or None when it has none."""
        return self._first(row, (field,))

    def image(self, row: int) -> ShardMember | None:
        """The sample's first image member (``IMAGE_FIELDS``) in tar order, or None."""
        return self._first(row, IMAGE_FIELDS)

    def read(self, row: int, field: str) -> bytes | None:
        """The bytes of field ``field`` of sample ``row``, or None when it has none."""
        member = self.member(row, field)
        return None if member is None else member.read()

    def label(self, row: int) -> str:
        """How messages name sample ``row``: ``<shard>:<sample key>``, as ``ShardMember.label``."""
        return f"{self.path}:{self.keys[row]}"

    def caption(self, row: int) -> str:
        """The ``.txt`` caption of sample ``row`` (``decode_caption``), errors naming ``label(row)``."""
        return decode_caption(self.read(row, CAPTION_FIELD), self.label(row), f"no .{CAPTION_FIELD} member")

    def samples_with(self, fields: Collection[str]) -> np.ndarray:
        """Rows of the samples having at least one of ``fields``, in order."""
        owners = np.repeat(np.arange(len(self.keys)), np.diff(self.starts))
        return np.unique(owners[np.isin(self.field_codes, self._codes(fields))])


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Shard paths from brace patterns (``"data/{00000..00009}.tar"``), ``::``-joined lists or a list."""
    patterns = shards.split(SOURCE_LIST_SEPARATOR) if isinstance(shards, str) else list(shards)
    return [path for pattern in patterns for path in _expanded(pattern)]


def _expanded(pattern: str) -> list[str]:
    try:
        return list(braceexpand.braceexpand(pattern))
    except braceexpand.UnbalancedBracesError:
        raise InputError(f"{pattern}: unbalanced braces (a shard pattern reads like data/{{00000..00009}}.tar)") from None


def offset_index_path(shard: Path) -> Path:
    """The cache file of a shard's index: hidden, so ``*.parquet`` globs over img2dataset output skip it."""
    return shard.with_name(f".{shard.name}.offsets.parquet")


def shard_index(shard: Path) -> ShardIndex:
    """The index of ``shard``: from its cache when the shard's size and mtime match, else scanned and cached."""
    try:
        stat = shard.stat()
    except FileNotFoundError as error:
        raise InputError(f"{shard}: no such shard") from error
    stamp = {b"version": OFFSET_INDEX_VERSION.encode(), b"size": str(stat.st_size).encode(),
             b"mtime_ns": str(stat.st_mtime_ns).encode()}
    cache = offset_index_path(shard)
    cached = _read_cache(shard, cache, stamp)
    if cached is not None:
        return cached
    index = scan_tar(shard)
    _write_cache(cache, index, stamp)
    return index


def shard_indexes(shards: Sequence[Path]) -> list[ShardIndex]:
    """The indexes of several shards, read or built by a few threads (shards may sit on a network file system)."""
    with ThreadPoolExecutor(max_workers=INDEX_THREADS) as pool:
        return list(pool.map(shard_index, shards))


def scan_tar(shard: Path) -> ShardIndex:
    """Read every member header of an uncompressed tar and group the members by sample key."""
    samples: dict[str, list[tuple[str, int, int]]] = {}  # key -> [(field, offset, size)]
    if shard.stat().st_size > 0:
        try:
            with tarfile.open(shard, mode="r:") as archive:
                for member in archive:
                    match = _KEY_AND_FIELD.match(member.name)
                    if member.isfile() and match is not None:
                        entry = (match.group(2).lower(), member.offset_data, member.size)
                        samples.setdefault(match.group(1), []).append(entry)
        except (tarfile.TarError, OSError) as error:
            raise InputError(f"{shard}: not a readable uncompressed tar shard ({one_line(error)})") from error
    members = [(key, *entry) for key, entries in samples.items() for entry in entries]
    columns = [list(column) for column in zip(*members)] or [[], [], [], []]
    return _index(shard, pa.array(columns[0], pa.string()), pa.array(columns[1], pa.string()),
                  np.array(columns[2], np.int64), np.array(columns[3], np.int64))


def _index(shard: Path, member_keys: pa.Array, fields: pa.Array, offsets: np.ndarray, sizes: np.ndarray) -> ShardIndex:
    """The index of members listed sample by sample (the members of a sample next to each other)."""
    keys, fields = member_keys.dictionary_encode(), fields.dictionary_encode()
    key_codes = keys.indices.to_numpy(zero_copy_only=False)
    firsts = np.flatnonzero(np.diff(key_codes, prepend=-1) != 0)  # where a new sample's members begin
    return ShardIndex(
        path=shard,
        keys=keys.dictionary.take(pa.array(key_codes[firsts])).to_pylist(),
        starts=np.append(firsts, len(key_codes)).astype(np.int64),
        field_names=fields.dictionary.to_pylist(),
        field_codes=fields.indices.to_numpy(zero_copy_only=False).astype(np.int32),
        offsets=offsets,
        sizes=sizes,
    )


def _read_cache(shard: Path, cache: Path, stamp: dict[bytes, bytes]) -> ShardIndex | None:
    try:
        table = pq.read_table(cache)
    except (OSError, pa.ArrowException):
        return None
    metadata = table.schema.metadata or {}
    if any(metadata.get(name) != value for name, value in stamp.items()):
        return None
    column = table.column
    return _index(shard, column("key").combine_chunks(), column("field").combine_chunks(),
                  column("offset").to_numpy(), column("size").to_numpy())


def _write_cache(cache: Path, index: ShardIndex, stamp: dict[bytes, bytes]) -> None:
    """Best effort: a read-only shard folder only means the index is rebuilt next time."""
    member_keys = np.repeat(np.array(index.keys, dtype=object), np.diff(index.starts))
    table = pa.table({
        "key": pa.array(member_keys.tolist(), pa.string()),
        "field": pa.array(index.field_names, pa.string()).take(pa.array(index.field_codes)),
        "offset": pa.array(index.offsets, pa.int64()),
        "size": pa.array(index.sizes, pa.int64()),
    })
    with suppress(OSError), atomic_path(cache) as tmp:
        pq.write_table(table.replace_schema_metadata(stamp), tmp)
