"""Materialising a split of the synthetic world as webdataset shards, in img2dataset's layout.

``{out_dir}/{shard:05d}.tar`` holds ``{key}.png`` (or ``.jpg``), ``{key}.txt`` (the caption) and
``{key}.json`` (key, caption and metadata); keys are img2dataset's ``shard * 10**digits + position``
zero-padded. ``index.parquet`` has one row per sample (key, shard, caption, metadata columns) and
``sizes.json`` the sample count per shard, as open_clip's webdataset loader reads it. Every file is
written to a temporary name and renamed, so a shard that exists is complete: a rerun writes only the
missing shards. ``world.json`` records what the directory holds, so a different world never mixes in.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipforge._util.fileio import atomic_path
from clipforge._util.progress import progress_bar
from clipforge.data.synthetic.config import Shift
from clipforge.errors import ConfigError, InputError

if TYPE_CHECKING:
    from clipforge.data.synthetic.world import SyntheticWorld

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG"}


def _encode(image: Any, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse a directory that already holds shards of another world, split or layout."""
    if path.exists():
        existing = json.loads(path.read_text())
        if existing != manifest:
            changed = sorted(key for key in manifest if existing.get(key) != manifest[key])
            raise ConfigError(f"{path}: holds other shards ({', '.join(changed)} differ); use an empty directory")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))


def write_shards(
    world: SyntheticWorld,
    split: str,
    n: int,
    out_dir: str | Path,
    shard_size: int = 1000,
    *,
    image_format: str = "png",
    shift: str | Shift | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write samples ``0 … n-1`` of ``split``; returns counts, written and skipped shard paths and the index path."""
    # Imported here: webdataset pulls in torch, and the synthetic world itself must stay quick to import.
    import pyarrow as pa
    import pyarrow.parquet as pq
    from webdataset import TarWriter

    if n < 1 or shard_size < 1:
        raise InputError(f"write_shards: n={n} and shard_size={shard_size} must be ≥ 1")
    if image_format not in IMAGE_FORMATS:
        raise InputError(f"write_shards: image_format {image_format!r} is not one of {', '.join(IMAGE_FORMATS)}")
    world.describe(split, 0, shift)  # refuses an unknown split or shift, or an empty split, before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shift_value = dataclasses.asdict(shift) if isinstance(shift, Shift) else shift
    manifest = {
        "world": dataclasses.asdict(world.config),
        "split": split,
        "n": n,
        "shard_size": shard_size,
        "image_format": image_format,
        "shift": shift_value,
    }
    _check_manifest(out / "world.json", json.loads(json.dumps(manifest)))

    digits = math.ceil(math.log10(shard_size))
    num_shards = math.ceil(n / shard_size)
    rows: list[dict[str, Any]] = []
    written: list[str] = []
    skipped: list[str] = []
    sizes: dict[str, int] = {}
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(f"{split} shards", total=n, unit="img")
        for shard in range(num_shards):
            path = out / f"{shard:05d}.tar"
            indices = range(shard * shard_size, min(n, (shard + 1) * shard_size))
            keys = [f"{shard * 10**digits + position:0{5 + digits}d}" for position in range(len(indices))]
            sizes[path.name] = len(indices)
            if path.exists():
                skipped.append(str(path))
                for key, index in zip(keys, indices, strict=True):
                    text, metadata = world.describe(split, index, shift)
                    rows.append({"key": key, "shard": shard, "caption": text, **metadata})
                bar.advance(task, len(indices))
                continue
            with atomic_path(path) as tmp, open(tmp, "wb") as stream:
                writer = TarWriter(stream, encoder=False, mtime=int(time.time()), format=tarfile.USTAR_FORMAT)
                for key, index in zip(keys, indices, strict=True):
                    sample = world.sample(split, index, shift)
                    record = {"key": key, "caption": sample.caption, **sample.metadata}
                    writer.write(
                        {
                            "__key__": key,
                            image_format: _encode(sample.image, image_format),
                            "txt": sample.caption.encode(),
                            "json": json.dumps(record, sort_keys=True).encode(),
                        }
                    )
                    rows.append({"key": key, "shard": shard, "caption": sample.caption, **sample.metadata})
                    bar.advance(task)
                writer.close()
            written.append(str(path))

    index_path = out / "index.parquet"
    with atomic_path(index_path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    with atomic_path(out / "sizes.json") as tmp:
        tmp.write_text(json.dumps(sizes, indent=2))
    return {
        "split": split,
        "n": n,
        "num_shards": num_shards,
        "written": written,
        "skipped": skipped,
        "index": str(index_path),
        "sizes": str(out / "sizes.json"),
    }
