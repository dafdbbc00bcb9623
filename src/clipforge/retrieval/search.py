"""Search over an embedding store through its saved faiss index: what the CLI and the server call.

``SearchIndex.build`` follows clip-retrieval's ``clip index`` (an index per modality, built with
autofaiss-style rules next to the embeddings, as clip-retrieval's ``clip_index`` does); results carry the
store's metadata, like clip-back's ``/knn-service`` answers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipforge.errors import InputError
from clipforge.retrieval.faiss_index import (
    add_vectors,
    as_float32,
    build_index,
    check_vectors,
    load_index,
    save_index,
)
from clipforge.retrieval.spec import (
    DEFAULT_MEMORY_BUDGET,
    FLAT_MAX_VECTORS,
    choose_index,
)
from clipforge.retrieval.store import EmbeddingStore
from clipforge.retrieval.tuning import tune


def index_dir(root: str | Path, kind: str) -> Path:
    """Where the index of ``kind`` embeddings of the store at ``root`` lives."""
    return Path(root) / "index" / kind


class SearchIndex:
    """A store's vectors of one kind ("img" or "text") behind their saved index, plus the metadata."""

    def __init__(self, root: str | Path, kind: str = "img", mmap: bool = True) -> None:
        self.store = EmbeddingStore(root)
        self.store.check_kind(kind)
        self.kind = kind
        self.index, self.spec = load_index(index_dir(root, kind), mmap=mmap)
        if self.index.ntotal != self.store.num_vectors or self.index.d != self.store.dim:
            raise InputError(
                f"{index_dir(root, kind)}: the index holds {self.index.ntotal} × {self.index.d} vectors but the "
                f"store holds {self.store.num_vectors} × {self.store.dim}; rebuild the index"
            )

    @classmethod
    def build(
        cls,
        root: str | Path,
        kind: str = "img",
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        target_recall: float = 0.95,
        k: int = 10,
        num_queries: int = 1000,
        flat_max_vectors: int = FLAT_MAX_VECTORS,
        progress: bool = True,
    ) -> SearchIndex:
        """Choose, build, tune and save the index of the store at ``root``, then open it.

        For approximate indexes the last ``num_queries`` rows (at most a tenth) are held out while the
        search parameters are tuned against exact search, then added, so tuning queries are never
        already in the index.
        """
        store = EmbeddingStore(root)
        vectors = store.load_embeddings(kind)
        spec = choose_index(store.num_vectors, store.dim, memory_budget, flat_max_vectors)
        held_out = 0 if spec.kind == "flat" else min(num_queries, store.num_vectors // 10)
        indexed = vectors[: store.num_vectors - held_out]
        index = build_index(indexed, spec, progress=progress)
        spec = tune(index, spec, indexed, vectors[len(indexed) :], target_recall=target_recall, k=k)
        add_vectors(index, vectors[len(indexed) :], progress=progress)
        save_index(index, spec, index_dir(root, kind))
        return cls(root, kind)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product top-k for each query row: (scores [q, k], ids [q, k]); ids are store rows, −1 if none."""
        return self.index.search(self._checked(queries, k), k)

    def _checked(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Query rows as float32 of the store's dimension, and k ≥ 1, or an ``InputError`` naming what is wrong."""
        queries = np.asarray(queries)
        check_vectors(queries, self.store.dim, "queries")
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        return as_float32(queries)

    def results(self, query_vector: np.ndarray, k: int = 10) -> list[dict]:
        """The top-k rows for one query vector: their metadata plus ``id`` (store row) and ``score``.

        Names are text; the exact bytes of a name that is not valid UTF-8 (``*_bytes``, see
        ``clipforge.data.formats.names``) stay in the store, so results are plain JSON.
        """
        scores, ids = self.search(np.asarray(query_vector).reshape(1, -1), k)
        found = ids[0] >= 0
        return self._records(ids[0][found], scores[0][found])

    def results_under(self, query_vector: np.ndarray, prefix: str, k: int = 10) -> list[dict]:
        """``results`` among the rows whose ``uid`` starts with ``prefix`` only (a subfolder of a photo folder).

        Exact: inner products with just those rows, read from the memory-mapped store, so the cost follows
        the subfolder's size and no hit of it is lost to an approximate index's candidate list.
        """
        query = self._checked(np.asarray(query_vector).reshape(1, -1), k)
        rows = self.store.rows_under(prefix)
        scores = np.empty(len(rows), dtype=np.float32)
        for part, embeddings in self.store.iter_parts(self.kind):
            inside = (rows >= part.offset) & (rows < part.offset + part.num_rows)
            scores[inside] = embeddings[rows[inside] - part.offset].astype(np.float32) @ query[0]
        best = np.argsort(-scores, kind="stable")[:k]
        return self._records(rows[best], scores[best])

    def _records(self, rows: np.ndarray, scores: np.ndarray) -> list[dict]:
        records = self.store.metadata(rows)
        return [
            {**{key: value for key, value in record.items() if not key.endswith("_bytes")}, "id": int(row), "score": float(score)}
            for record, row, score in zip(records, rows, scores)
        ]
