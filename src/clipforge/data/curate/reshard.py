"""Rebuild webdataset shards holding only a subset's samples (DataComp's ``resharder.py -s subset.npy``).

The kept samples, in pool order, are cut into output shards of ``shard_size``; output shard ``j`` is one task
writing ``{j:05d}.tar`` (every member of each sample copied byte for byte: image, ``.txt``, ``.json``,
``.captions.json``, ...) with fixed tar metadata, so reruns and engines give identical bytes; a finished
shard is skipped. ``sizes.json`` lists the sample count per shard, as open_clip's loader reads it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from clipforge._util.fileio import atomic_path
from clipforge.data.curate.engine import Engine
from clipforge.data.curate.pool import run_task
from clipforge.data.curate.subset import in_subset, uid_pairs
from clipforge.data.curate.tarfiles import sample_members, write_tar
from clipforge.data.formats.shards import shard_index
from clipforge.errors import ConfigError


@dataclass(frozen=True)
class ReshardTask:
    """Output shard ``number``: samples ``(input shard path, key)`` in order."""

    out: str
    number: int
    samples: tuple[tuple[str, str], ...]

    @property
    def output(self) -> Path:
        return Path(self.out) / f"{self.number:05d}.tar"

    def __call__(self) -> int:
        if self.output.exists():
            return len(self.samples)
        indexes = {path: shard_index(Path(path)) for path in dict.fromkeys(path for path, _ in self.samples)}
        rows = {path: {key: row for row, key in enumerate(index.keys)} for path, index in indexes.items()}
        return write_tar(self.output, ((key, sample_members(indexes[path], rows[path][key])) for path, key in self.samples))


def reshard(shards: Sequence[Path], pool: pa.Table, subset: np.ndarray, out: Path, engine: Engine, shard_size: int = 10_000) -> dict[str, int]:
    """Write the subset's samples as shards of ``shard_size`` into ``out``; returns the samples per shard."""
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size} must be at least 1")
    readable = np.array([error is None for error in pool.column("error").to_pylist()], dtype=bool)
    kept = np.flatnonzero(readable & in_subset(uid_pairs(pool.column("uid").to_pylist()), subset))
    positions, keys = pool.column("shard").to_numpy(), pool.column("key").to_pylist()
    samples = [(str(shards[int(positions[row])]), keys[row]) for row in kept]
    tasks = [ReshardTask(str(out), number, tuple(samples[start : start + shard_size]))
             for number, start in enumerate(range(0, len(samples), shard_size))]
    engine.map(run_task, tasks)
    sizes = {task.output.name: len(task.samples) for task in tasks}
    with atomic_path(out / "sizes.json") as tmp:
        tmp.write_text(json.dumps(sizes, indent=2))
    return sizes
