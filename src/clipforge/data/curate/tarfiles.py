"""Deterministic tar writing for curated shards: members in the given order, fixed metadata (mtime 0, owner
0, mode 0644, ustar), so the same samples always give the same bytes whichever engine or run wrote them."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

from clipforge._util.fileio import atomic_path
from clipforge.data.formats.shards import ShardIndex


def sample_members(index: ShardIndex, row: int) -> list[tuple[str, bytes]]:
    """(field, bytes) of every member of sample ``row``, in tar order."""
    start, stop = int(index.starts[row]), int(index.starts[row + 1])
    with open(index.path, "rb") as stream:
        members = []
        for entry in range(start, stop):
            stream.seek(int(index.offsets[entry]))
            members.append((index.field_names[int(index.field_codes[entry])], stream.read(int(index.sizes[entry]))))
    return members


def write_tar(path: Path, samples: Iterable[tuple[str, list[tuple[str, bytes]]]]) -> int:
    """Write ``(key, [(field, bytes), ...])`` samples as ``{key}.{field}`` members; returns the sample count."""
    count = 0
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as archive:
        for key, members in samples:
            for field, data in members:
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                archive.addfile(info, io.BytesIO(data))
            count += 1
    return count
