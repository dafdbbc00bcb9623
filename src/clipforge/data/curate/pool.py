"""The pool: webdataset shards (img2dataset's layout) scanned once into one metadata row per sample.

``scan_shard`` is the per-shard task: for every sample with an image or a caption it records the uid (the
``.json`` member's ``uid`` when it is DataComp's 32 hex digits, else ``subset.derived_uid``), the key, the
caption (``decode_caption``), the decoded image's size and the SHA-256 of its bytes; a sample whose image or
caption cannot be read gets its one-line reason in ``error`` and is never kept by any step. Its output,
``scan/{position:05d}.parquet``, is written atomically and a task finding it returns at once.

``job.json`` in the output folder records the inputs and settings; a rerun with other ones is refused, so a
resumed job never mixes the outputs of two jobs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipforge._util.fileio import atomic_path
from clipforge.data.curate.subset import derived_uid, is_uid
from clipforge.data.formats.images import read_image
from clipforge.data.formats.shards import (
    CAPTION_FIELD,
    IMAGE_FIELDS,
    expand_shards,
    shard_index,
)
from clipforge.errors import ConfigError, InputError

JOB_RECORD = "job.json"
SCHEMA = pa.schema([
    ("uid", pa.string()), ("shard", pa.int32()), ("key", pa.string()), ("caption", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), ("error", pa.string()),
])


def pool_shards(inputs: Sequence[str | Path]) -> list[Path]:
    """Shard paths of the inputs: brace patterns, ``::`` lists, ``.tar`` files or folders of them (name order)."""
    shards: list[Path] = []
    for given in inputs:
        for expanded in expand_shards(str(given)):
            path = Path(expanded)
            if path.is_dir():
                found = sorted(path.glob("*.tar"))
                if not found:
                    raise InputError(f"{path}: no .tar shards in this folder")
                shards.extend(found)
            elif path.suffix == ".tar":
                if not path.is_file():
                    raise InputError(f"{path}: no such shard")
                shards.append(path)
            else:
                raise InputError(f"{path}: not a .tar shard or a folder of shards")
    if not shards:
        raise InputError("no shards given")
    return shards


def claim_job(out: Path, record: dict[str, Any]) -> None:
    """Write ``job.json``, or check that ``out`` already holds this very job."""
    record = json.loads(json.dumps(record))
    path = out / JOB_RECORD
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except ValueError as error:
            raise InputError(f"{path}: unreadable job record ({error})") from None
        if existing != record:
            changed = sorted(key for key in record | existing if existing.get(key) != record.get(key))
            raise ConfigError(f"{out}: holds another curation job ({', '.join(changed)} differ); use an empty directory")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))


def _uid(index: Any, row: int, shard: Path) -> str:
    raw = index.read(row, "json")
    if raw is not None:
        try:
            uid = json.loads(raw).get("uid")
        except (ValueError, AttributeError):
            uid = None
        if is_uid(uid):
            return uid.lower()
    return derived_uid(shard.name, index.keys[row])


def _sample_rows(index: Any) -> list[int]:
    """The rows the scan records: the samples with an image or a caption."""
    return index.samples_with((*IMAGE_FIELDS, CAPTION_FIELD)).tolist()


def pool_uids(shards: Sequence[Path]) -> Iterator[str]:
    """The uids the scan records, in pool order, read from the ``.json`` members alone (no image is decoded)."""
    for shard in shards:
        index = shard_index(shard)
        for row in _sample_rows(index):
            yield _uid(index, row, shard)


def _scan_row(index: Any, row: int, shard: Path, position: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"uid": _uid(index, row, shard), "shard": position, "key": index.keys[row], "caption": None,
                             "width": None, "height": None, "sha256": None, "error": None}
    try:
        entry["caption"] = index.caption(row)
        member = index.image(row)
        if member is None:
            raise InputError(f"{index.label(row)}: missing image")
        data = member.read()
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        entry["width"], entry["height"] = read_image(data, name=index.label(row)).size
    except InputError as error:
        entry["error"] = str(error).removeprefix(f"{index.label(row)}: ")
    return entry


@dataclass(frozen=True)
class ScanTask:
    """Scan shard ``shard`` (at ``position`` of the pool) into ``out/scan/{position:05d}.parquet``."""

    shard: str
    position: int
    out: str

    @property
    def output(self) -> Path:
        return Path(self.out) / "scan" / f"{self.position:05d}.parquet"

    def __call__(self) -> int:
        if self.output.exists():
            return pq.ParquetFile(self.output).metadata.num_rows
        shard = Path(self.shard)
        index = shard_index(shard)
        rows = [_scan_row(index, row, shard, self.position) for row in _sample_rows(index)]
        with atomic_path(self.output) as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
        return len(rows)


def run_task(task: Any) -> Any:
    """The engines' entry point: tasks are callable dataclasses (picklable, so they travel to workers)."""
    return task()


def scan_pool(shards: Sequence[Path], out: Path, engine: Any) -> pa.Table:
    """Every shard scanned (unfinished ones only) and the rows of all of them, in pool order."""
    tasks = [ScanTask(str(shard), position, str(out)) for position, shard in enumerate(shards)]
    engine.map(run_task, tasks)
    return pa.concat_tables([pq.read_table(task.output) for task in tasks])
