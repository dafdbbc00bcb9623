"""Deduplication: exact (content hash) and near-duplicate (embedding cosine) groups, and removal of pool
images too close to an evaluation set (DataComp §3.2 removes near-duplicates of evaluation images from its
pool; Gadre et al., NeurIPS 2023 D&B).

Near-duplicates: every pair of images whose embeddings have cosine similarity ≥ ``threshold`` is an edge
(faiss ``range_search`` on an exact inner-product index); the connected components of that graph are the
groups (``scipy.sparse.csgraph``), and each group keeps its first member in pool order. DataComp flags
evaluation-set duplicates with a dedicated copy-detection model; here the embeddings are the model's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipforge.errors import ConfigError


def first_of_groups(groups: np.ndarray) -> np.ndarray:
    """Keep mask: True for the first member (lowest index) of each group label."""
    _, first = np.unique(groups, return_index=True)
    keep = np.zeros(len(groups), dtype=bool)
    keep[first] = True
    return keep


def exact_groups(hashes: Sequence[str]) -> np.ndarray:
    """Group label per sample: samples with equal content hashes share it (labels are first occurrences)."""
    first: dict[str, int] = {}
    return np.array([first.setdefault(value, index) for index, value in enumerate(hashes)], dtype=np.int64)


def _check_threshold(threshold: float) -> None:
    if not -1.0 <= threshold <= 1.0:
        raise ConfigError(f"dedup: cosine threshold {threshold} is not in [-1, 1]")


def similar_pairs(queries: np.ndarray, database: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(query row, database row) of every pair with inner product ≥ ``threshold`` (exact faiss range search)."""
    import faiss

    _check_threshold(threshold)
    database = np.ascontiguousarray(database, dtype=np.float32)
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    # range_search keeps similarities strictly above its radius; step just below the threshold.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    limits, _, labels = index.range_search(np.ascontiguousarray(queries, dtype=np.float32), radius)
    rows = np.repeat(np.arange(len(queries)), np.diff(limits.astype(np.int64)))
    return rows, labels.astype(np.int64)


def near_duplicate_groups(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """Connected-component label per embedding (L2-normalised rows) of the graph of pairs with cosine ≥ threshold."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    count = len(embeddings)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    rows, columns = similar_pairs(embeddings, embeddings, threshold)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, columns)), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    # Relabel each component by its first member, so labels read as "duplicate of row …".
    first = np.full(labels.max() + 1, count, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(count))
    return first[labels]


def near_evaluation(embeddings: np.ndarray, evaluation: np.ndarray, threshold: float) -> np.ndarray:
    """Mask of pool rows with cosine ≥ ``threshold`` to some evaluation image (to remove them)."""
    flagged = np.zeros(len(embeddings), dtype=bool)
    if len(embeddings) and len(evaluation):
        rows, _ = similar_pairs(embeddings, evaluation, threshold)
        flagged[rows] = True
    return flagged
