"""The embedding store: clip-retrieval's on-disk layout of embedding parts plus aligned metadata.

    DIR/img_emb/img_emb_{i}.npy        float16, L2-normalised, [n_i, d]
    DIR/text_emb/text_emb_{i}.npy      same rows, text side (optional)
    DIR/metadata/metadata_{i}.parquet  one row per vector, same order; columns ``uid`` and ``path`` or ``caption``

This is the layout written by rom1504/clip-retrieval's ``clip inference`` and read by autofaiss, so
stores are interchangeable with those tools (rom1504/clip-retrieval's ``clip_inference`` output, criteo/autofaiss's input). Global row ``r``
is row ``r - offset`` of the part that holds it, parts taken in numeric order (1 < 2 < 10).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipforge._util.fileio import atomic_path
from clipforge.errors import InputError

KINDS = ("img", "text")
METADATA_ROW_GROUP = 16_384  # rows per parquet row group: ``metadata()`` decodes only the groups it needs
NORM_TOLERANCE = 1e-2  # float16 storage keeps norms within ~1e-3 of 1


def embedding_path(root: str | Path, kind: str, part: int) -> Path:
    return Path(root) / f"{kind}_emb" / f"{kind}_emb_{part}.npy"


def metadata_path(root: str | Path, part: int) -> Path:
    return Path(root) / "metadata" / f"metadata_{part}.parquet"


@dataclass(frozen=True)
class StorePart:
    """One part of the store: its number, its first global row and its row count."""

    index: int
    offset: int
    num_rows: int


def _part_numbers(folder: Path, prefix: str, suffix: str) -> set[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+){re.escape(suffix)}$")
    matches = (pattern.match(path.name) for path in folder.iterdir()) if folder.is_dir() else ()
    return {int(match.group(1)) for match in matches if match}


def _npy_shape(path: Path) -> tuple[int, ...]:
    try:
        return np.load(path, mmap_mode="r").shape
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable .npy array ({error})") from None


class EmbeddingStore:
    """A validated, read-only view of a clip-retrieval embedding folder.

    Every embedding part must have its metadata part with the same row count, and every part of
    every kind the same dimension; otherwise ``InputError`` names the file at fault.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: no such embedding folder")
        numbers_of_kind = {kind: _part_numbers(self.root / f"{kind}_emb", f"{kind}_emb", ".npy") for kind in KINDS}
        self.kinds = tuple(kind for kind in KINDS if numbers_of_kind[kind])
        if not self.kinds:
            raise InputError(f"{self.root}: no img_emb/img_emb_*.npy or text_emb/text_emb_*.npy parts")
        numbers = sorted(set().union(*numbers_of_kind.values()))
        self.dim = 0
        self.parts: list[StorePart] = []
        offset = 0
        for number in numbers:
            num_rows = self._check_part(number)
            self.parts.append(StorePart(number, offset, num_rows))
            offset += num_rows
        self.num_vectors = offset
        self._offsets = np.array([part.offset for part in self.parts], dtype=np.int64)

    def _check_part(self, number: int) -> int:
        """The row count of part ``number``, after checking every kind's embeddings against its metadata."""
        meta = metadata_path(self.root, number)
        if not meta.is_file():
            raise InputError(f"{meta}: missing metadata part for embedding part {number}")
        try:
            num_rows = pq.ParquetFile(meta).metadata.num_rows
        except (OSError, pa.ArrowException) as error:
            raise InputError(f"{meta}: not a readable parquet file ({error})") from None
        for kind in self.kinds:
            path = embedding_path(self.root, kind, number)
            if not path.is_file():
                raise InputError(f"{path}: missing {kind} embedding part {number} (other kinds have it)")
            shape = _npy_shape(path)
            if len(shape) != 2 or shape[0] != num_rows:
                raise InputError(f"{path}: shape {shape} does not match the {num_rows} rows of {meta.name}")
            if self.dim and shape[1] != self.dim:
                raise InputError(f"{path}: dimension {shape[1]} differs from the store's {self.dim}")
            self.dim = shape[1]
        return num_rows

    def check_kind(self, kind: str) -> None:
        """Raise ``InputError`` unless the store has embeddings of ``kind``."""
        if kind not in self.kinds:
            raise InputError(f"{self.root}: no {kind}_emb parts (has: {', '.join(self.kinds)})")

    def iter_parts(self, kind: str = "img") -> Iterator[tuple[StorePart, np.ndarray]]:
        """Each part with its embeddings memory-mapped as stored (float16), in numeric order."""
        self.check_kind(kind)
        for part in self.parts:
            yield part, np.load(embedding_path(self.root, kind, part.index), mmap_mode="r")

    def load_embeddings(self, kind: str = "img", mmap: bool = True) -> np.ndarray:
        """All vectors of ``kind`` as one float32 [N, d] array.

        With ``mmap`` the parts are mapped rather than read, so the only memory used is the result;
        a store of a single float32 part is returned as the mapped array itself.
        """
        self.check_kind(kind)
        paths = [embedding_path(self.root, kind, part.index) for part in self.parts]
        mode = "r" if mmap else None
        if len(paths) == 1:
            array = np.load(paths[0], mmap_mode=mode)
            return array if array.dtype == np.float32 else array.astype(np.float32)
        out = np.empty((self.num_vectors, self.dim), dtype=np.float32)
        for part, path in zip(self.parts, paths):
            out[part.offset : part.offset + part.num_rows] = np.load(path, mmap_mode=mode)
        return out

    def metadata(self, rows: np.ndarray) -> list[dict]:
        """The metadata rows of the given global row numbers, in that order.

        Only the parquet parts (and within them only the row groups) holding those rows are read.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        bad = rows[(rows < 0) | (rows >= self.num_vectors)]
        if bad.size:
            raise InputError(f"{self.root}: row {bad[0]} is out of range (the store holds {self.num_vectors} vectors)")
        part_of_row = np.searchsorted(self._offsets, rows, side="right") - 1
        found: dict[int, dict] = {}
        for part_number in np.unique(part_of_row):
            part = self.parts[part_number]
            wanted = np.unique(rows[part_of_row == part_number]) - part.offset
            records = self._read_rows(part, wanted)
            found.update((part.offset + local, record) for local, record in zip(wanted.tolist(), records))
        return [dict(found[row]) for row in rows.tolist()]

    def rows_under(self, prefix: str) -> np.ndarray:
        """Global row numbers whose ``uid`` starts with ``prefix`` (in a photo folder's store: the photos
        under a subfolder), reading only the ``uid`` column."""
        rows = []
        for part in self.parts:
            uids = pq.read_table(metadata_path(self.root, part.index), columns=["uid"]).column("uid")
            matches = pc.starts_with(uids, prefix).to_numpy(zero_copy_only=False)
            rows.append(part.offset + np.flatnonzero(matches))
        return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)

    def _read_rows(self, part: StorePart, local_rows: np.ndarray) -> list[dict]:
        """Sorted local rows of one part, decoding only the row groups that contain them."""
        parquet = pq.ParquetFile(metadata_path(self.root, part.index))
        group_sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        group_starts = np.concatenate([[0], np.cumsum(group_sizes)])
        group_of_row = np.searchsorted(group_starts, local_rows, side="right") - 1
        groups = np.unique(group_of_row).tolist()
        table = parquet.read_row_groups(groups)
        start_in_table = dict(zip(groups, np.cumsum([0] + [group_sizes[g] for g in groups[:-1]])))
        positions = [start_in_table[g] + row - group_starts[g] for row, g in zip(local_rows, group_of_row.tolist())]
        return table.take(pa.array(positions)).to_pylist()


def write_part(
    root: str | Path, kind: str, part: int, embeddings: np.ndarray, metadata_table: pa.Table | None
) -> None:
    """Write embedding part ``part`` of ``kind`` (as float16) and, if given, its metadata part.

    Each file is written to a temporary sibling and moved into place with ``os.replace``, so a
    crash never leaves a partial part. The embeddings go first: a part whose metadata is missing
    is reported by ``EmbeddingStore``, and a re-run rewrites it. Pass ``metadata_table=None`` when
    another kind of the same part already wrote the (identical) metadata.
    """
    if kind not in KINDS:
        raise InputError(f"embedding kind {kind!r} is not one of {', '.join(KINDS)}")
    embeddings = np.asarray(embeddings)
    target = embedding_path(root, kind, part)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise InputError(f"{target}: embeddings must be a non-empty [n, d] array, got shape {embeddings.shape}")
    norms = np.linalg.norm(embeddings.astype(np.float32), axis=1)
    if not np.all(np.abs(norms - 1.0) < NORM_TOLERANCE):
        worst = int(np.argmax(np.abs(norms - 1.0)))
        raise InputError(f"{target}: row {worst} has norm {norms[worst]:.4f}; embeddings must be L2-normalised")
    if metadata_table is not None:
        meta = metadata_path(root, part)
        if metadata_table.num_rows != embeddings.shape[0]:
            raise InputError(f"{meta}: {metadata_table.num_rows} metadata rows for {embeddings.shape[0]} embeddings")
        names = set(metadata_table.column_names)
        if "uid" not in names or not names & {"path", "caption"}:
            raise InputError(f"{meta}: metadata needs a 'uid' column and a 'path' or 'caption' column")
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        np.save(handle, embeddings.astype(np.float16))
    if metadata_table is not None:
        with atomic_path(meta) as tmp:
            pq.write_table(metadata_table, tmp, row_group_size=METADATA_ROW_GROUP)
