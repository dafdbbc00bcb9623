"""Building, saving and loading faiss indexes over L2-normalised vectors (inner product = cosine).

Indexes are built from an ``IndexSpec`` (see ``clipforge.retrieval.spec``) with faiss's
``index_factory`` (Johnson, Douze & Jégou, "Billion-scale similarity search with GPUs", 2017;
Douze et al., "The Faiss library", 2024). Training uses a random sample, vectors are added in
chunks so float16 or memory-mapped stores never need a float32 copy, and a saved index is a
directory holding ``index.faiss`` and ``index.json`` (spec, measured recall, search parameters),
each written atomically.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np

from clipforge._util.fileio import atomic_path
from clipforge._util.progress import error_console, progress_bar
from clipforge.errors import ConfigError, InputError
from clipforge.retrieval.spec import IndexSpec

ADD_CHUNK = 65_536
INDEX_FILE = "index.faiss"
SPEC_FILE = "index.json"
FORMAT_VERSION = 1
# Flat codes (Flat, HNSW storage, scalar-quantised refine copies) and IVF lists are mapped, not read.
# Fast-scan IVF lists are stored in blocks that faiss cannot map; they are read into memory.
MMAP_FLAGS = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY


def as_float32(vectors: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 array (no copy when it already is one)."""
    return np.ascontiguousarray(vectors, dtype=np.float32)


def check_vectors(vectors: np.ndarray, dim: int, what: str) -> None:
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise InputError(f"{what}: expected an [n, {dim}] array, got shape {tuple(vectors.shape)}")


def apply_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Set search-time parameters by their faiss ``ParameterSpace`` names, through any wrappers."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            raise ConfigError(f"search parameter {name!r} does not apply to a {type(index).__name__}") from None


def add_vectors(index: faiss.Index, vectors: np.ndarray, progress: bool = True) -> None:
    """Add ``vectors`` (any float dtype, possibly memory-mapped) in chunks of ``ADD_CHUNK`` rows."""
    with progress_bar(disable=not progress, transient=True) as bar:
        task = bar.add_task("adding vectors", total=len(vectors), unit="vec")
        for start in range(0, len(vectors), ADD_CHUNK):
            chunk = as_float32(vectors[start : start + ADD_CHUNK])
            index.add(chunk)
            bar.advance(task, len(chunk))


def build_index(vectors: np.ndarray, spec: IndexSpec, progress: bool = True, seed: int = 0) -> faiss.Index:
    """An index of ``spec.factory`` holding ``vectors`` (ids = row numbers), with ``spec.params`` applied.

    Indexes that need training (IVF, PQ, SQ) are trained on ``spec.train_size`` random rows.
    """
    check_vectors(vectors, spec.dim, "vectors to index")
    index = faiss.index_factory(spec.dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        size = min(len(vectors), spec.train_size or len(vectors))
        rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))
        status = error_console.status(f"training {spec.factory} on {size:,} vectors") if progress else nullcontext()
        with status:
            index.train(as_float32(vectors[rows]))
    add_vectors(index, vectors, progress)
    apply_search_params(index, spec.params)
    return index


def index_bytes(index: faiss.Index) -> int:
    """The size of the index's data structures, measured as its serialised size."""
    return int(faiss.serialize_index(index).nbytes)


def save_index(index: faiss.Index, spec: IndexSpec, path: str | Path) -> None:
    """Write ``path/index.faiss`` then ``path/index.json``, each through a temporary file."""
    path = Path(path)
    with atomic_path(path / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    description = {
        "format": FORMAT_VERSION,
        "faiss_version": faiss.__version__,
        "num_vectors": int(index.ntotal),
        "dim": int(index.d),
        "spec": asdict(spec),
    }
    with atomic_path(path / SPEC_FILE) as tmp:
        tmp.write_text(json.dumps(description, indent=2))


def load_index(path: str | Path, mmap: bool = True) -> tuple[faiss.Index, IndexSpec]:
    """The index saved at ``path`` and its spec, with the tuned search parameters re-applied.

    With ``mmap`` the index's codes are memory-mapped read-only (``IO_FLAG_MMAP | IO_FLAG_MMAP_IFC``),
    so several processes share one copy in the page cache.
    """
    path = Path(path)
    spec_path, index_path = path / SPEC_FILE, path / INDEX_FILE
    if not spec_path.is_file():
        raise InputError(f"{spec_path}: missing index description; build the index first")
    try:
        description = json.loads(spec_path.read_text())
        spec = IndexSpec.from_dict(description["spec"])
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{spec_path}: not a clipforge index description ({error})") from None
    if not index_path.is_file():
        raise InputError(f"{index_path}: missing index file")
    try:
        index = faiss.read_index(str(index_path), MMAP_FLAGS if mmap else 0)
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1]
        raise InputError(f"{index_path}: not a readable faiss index ({message})") from None
    if index.ntotal != description.get("num_vectors") or index.d != description.get("dim"):
        raise InputError(
            f"{spec_path}: describes {description.get('num_vectors')} × {description.get('dim')} vectors but "
            f"{INDEX_FILE} holds {index.ntotal} × {index.d}; rebuild the index"
        )
    apply_search_params(index, spec.params)
    return index, spec
