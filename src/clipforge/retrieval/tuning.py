"""Choosing search parameters that reach a target recall@k, measured against exact search.

Follows autofaiss's ``tune_index`` idea (criteo/autofaiss ``autofaiss/external/optimize.py``): the cheapest setting of
``efSearch`` (HNSW) or ``nprobe`` (IVF) whose recall@k on held-out queries reaches the target,
found by doubling then bisection. Two changes: the target must be met by the recall's lower
confidence bound (mean − 2 standard errors over queries), so the setting holds on new queries too,
and for re-ranked IVF-PQ indexes the re-ranking depth ``k_factor_rf`` is chosen first, at full
probing, halfway between the target and the best recall any depth reaches.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace

import faiss
import numpy as np

from clipforge.errors import InputError
from clipforge.retrieval.faiss_index import (
    apply_search_params,
    as_float32,
    check_vectors,
)
from clipforge.retrieval.spec import IndexSpec

EXACT_CHUNK = 262_144
CONFIDENCE_Z = 2.0
MAX_EF_SEARCH = 4096
MAX_K_FACTOR = 256


def exact_search(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over ``vectors`` (any float dtype, possibly memory-mapped), in chunks."""
    queries = as_float32(queries)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start in range(0, len(vectors), EXACT_CHUNK):
        chunk = as_float32(vectors[start : start + EXACT_CHUNK])
        scores, ids = faiss.knn(queries, chunk, k, faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(ids >= 0, ids + start, -1))
    heap.finalize()
    return heap.D, heap.I


def recall_per_query(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """For each query, the fraction of its true top-k ids that appear among the found ids."""
    hits = (truth[:, :, None] == found[:, None, :]) & (truth[:, :, None] >= 0)
    return hits.any(axis=2).sum(axis=1) / truth.shape[1]


class _RecallMeter:
    """Recall@k of an index on fixed queries with known exact neighbours, for given search parameters."""

    def __init__(self, index: faiss.Index, queries: np.ndarray, truth: np.ndarray) -> None:
        self.index, self.queries, self.truth = index, queries, truth

    def __call__(self, params: dict[str, int]) -> tuple[float, float]:
        """(mean recall, its lower confidence bound)."""
        apply_search_params(self.index, params)
        recalls = recall_per_query(self.index.search(self.queries, self.truth.shape[1])[1], self.truth)
        spread = recalls.std(ddof=1) / np.sqrt(len(recalls))
        return float(recalls.mean()), float(recalls.mean() - CONFIDENCE_Z * spread)


def _smallest_passing(
    measure: Callable[[int], tuple[float, float]], low: int, high: int, target: float
) -> tuple[int, float, bool]:
    """The smallest value in [low, high] whose recall lower bound reaches ``target``, to within 1/8.

    Doubling from ``low``, then bisection between the last failing and the first passing value.
    Returns (value, its mean recall, reached); when even ``high`` fails, (high, its recall, False).
    """
    failing, value = None, low
    while True:
        recall, lower = measure(value)
        if lower >= target:
            break
        if value >= high:
            return high, recall, False
        failing, value = value, min(2 * value, high)
    while failing is not None and value - failing > max(1, failing // 8):
        middle = (failing + value) // 2
        middle_recall, middle_lower = measure(middle)
        if middle_lower >= target:
            value, recall = middle, middle_recall
        else:
            failing = middle
    return value, recall, True


def tune(
    index: faiss.Index,
    spec: IndexSpec,
    vectors: np.ndarray,
    queries: np.ndarray,
    target_recall: float = 0.95,
    k: int = 10,
) -> IndexSpec:
    """The spec with the cheapest search parameters reaching ``target_recall`` at ``k``, applied to ``index``.

    ``vectors`` are the indexed vectors (row i = id i), used for exact ground truth; ``queries`` must be
    held out (not in the index): for a graph index a query that is itself indexed finds its way to
    its own neighbours far more easily than a new one. The returned spec records the chosen
    parameters and the recall they reached; a warning says so when the target is out of reach.
    """
    if spec.kind == "flat":
        return replace(spec, recall=1.0, recall_k=k, target_recall=target_recall)
    check_vectors(queries, spec.dim, "tuning queries")
    if len(queries) < 2:
        raise InputError(f"tuning {spec.factory} needs at least 2 held-out queries, got {len(queries)}")
    measure = _RecallMeter(index, as_float32(queries), exact_search(queries, vectors, k)[1])
    if spec.kind == "hnsw":
        value, recall, reached = _smallest_passing(
            lambda ef: measure({"efSearch": ef}), k, MAX_EF_SEARCH, target_recall
        )
        params = {"efSearch": value}
    else:
        nlist = faiss.extract_index_ivf(index).nlist

        def probing(nprobe: int) -> dict[str, int]:
            with_quantizer = {"quantizer_efSearch": 2 * nprobe} if "quantizer_efSearch" in spec.params else {}
            return {"nprobe": nprobe, **with_quantizer}

        depth = {}
        if "k_factor_rf" in spec.params:
            depth = {"k_factor_rf": _refine_depth(measure, probing(nlist), target_recall)}
        value, recall, reached = _smallest_passing(
            lambda nprobe: measure({**probing(nprobe), **depth}), 1, nlist, target_recall
        )
        params = {**probing(value), **depth}
    apply_search_params(index, params)
    if not reached:
        warnings.warn(
            f"{spec.factory}: recall@{k} reached only {recall:.3f} < target {target_recall} "
            f"at the largest setting {params}; lower the target or give the index more memory",
            stacklevel=2,
        )
    return replace(spec, params=params, recall=recall, recall_k=k, target_recall=target_recall)


def _refine_depth(measure: _RecallMeter, full_probe: dict[str, int], target: float) -> int:
    """The smallest power-of-two re-ranking depth whose full-probe recall is halfway from target to ceiling."""
    ceiling, _ = measure({**full_probe, "k_factor_rf": MAX_K_FACTOR})
    aim = target + max(0.0, ceiling - target) / 2
    k_factor = 1
    while k_factor < MAX_K_FACTOR:
        recall, lower = measure({**full_probe, "k_factor_rf": k_factor})
        if recall >= aim and lower >= target:
            break
        k_factor *= 2
    return k_factor
