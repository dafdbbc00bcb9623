"""Finding images to embed and writing embeddings with their sources to parquet."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.errors import InputError
from clipforge.fileio import atomic_path
from clipforge.imageio import is_image_path


def collect_image_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given and image files under folders (sorted); a missing input is an error naming it."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.rglob("*") if p.is_file() and is_image_path(p)))
        elif path.is_file():
            paths.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    if not paths:
        raise InputError(f"no images found in {', '.join(map(str, inputs))}")
    return paths


def write_embeddings(path: str | Path, sources: Sequence[str], vectors: np.ndarray, *, model: str, kind: str) -> None:
    """A parquet table ``source | embedding`` (fixed-size float32 lists), written atomically."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    table = pa.table({"source": pa.array(list(sources), pa.string()), "embedding": column})
    table = table.replace_schema_metadata({"clipforge": json.dumps({"model": model, "kind": kind, "dim": vectors.shape[1]})})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Sources and an [N, D] float32 array from a file written by ``write_embeddings``."""
    table = pq.read_table(path)
    dim = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return table.column("source").to_pylist(), vectors
