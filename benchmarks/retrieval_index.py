"""Vector index: choose, build and tune an index over random unit vectors, then time single queries.

1M random L2-normalised 512-d vectors (``--quick``: 100k) under a memory budget of half their float32
size, so exact search is ruled out as it would be for a larger collection. Random vectors are the
hardest case for approximate search: they have no cluster structure, and the 10th neighbour scores
barely above the 11th. The index is tuned for recall@10 ≥ 0.95 on 1,000 held-out queries; latency
and recall are then measured on 1,000 other held-out queries, one query at a time on one thread
(as a server answers them), against exact search. Exact single-query search is timed for reference.

    python benchmarks/retrieval_index.py [--quick]
"""

from __future__ import annotations

import os

# On a shared machine, OpenMP threads that spin while waiting starve each other: training 256 small
# PQ codebooks took 60 s instead of 2.6 s with the machine's load at 6 on 2 cores. Must precede faiss.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import time  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from _common import parser, report  # noqa: E402

from clipforge.retrieval import (  # noqa: E402
    build_index,
    choose_index,
    exact_search,
    index_bytes,
    recall_per_query,
    tune,
)

K = 10
EXACT_TIMED_QUERIES = 50


def unit_vectors(rng: np.random.Generator, n: int, d: int, chunk: int = 100_000) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), d), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def single_query_ms(search, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Milliseconds per query and the ids found, one query at a time."""
    times, found = [], []
    for query in queries:
        start = time.perf_counter()
        found.append(search(query[None]))
        times.append(time.perf_counter() - start)
    return 1e3 * np.array(times), np.vstack(found)


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--num-vectors", type=int, help="default 1,000,000 (100,000 with --quick)")
    arguments.add_argument("--dim", type=int, default=512)
    arguments.add_argument("--budget-fraction", type=float, default=0.5, help="budget / float32 size of the vectors")
    arguments.add_argument("--target-recall", type=float, default=0.95)
    arguments.add_argument("--queries", type=int, default=1000)
    args = arguments.parse_args()
    num_vectors = args.num_vectors or (100_000 if args.quick else 1_000_000)
    rng = np.random.default_rng(0)
    vectors = unit_vectors(rng, num_vectors, args.dim)
    tuning_queries, test_queries = unit_vectors(rng, args.queries, args.dim), unit_vectors(rng, args.queries, args.dim)
    budget = int(args.budget_fraction * vectors.nbytes)

    spec = choose_index(num_vectors, args.dim, budget)
    start = time.perf_counter()
    index = build_index(vectors, spec)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    spec = tune(index, spec, vectors, tuning_queries, target_recall=args.target_recall, k=K)
    tune_s = time.perf_counter() - start
    truth = exact_search(test_queries, vectors, K)[1]

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    latency, found = single_query_ms(lambda q: index.search(q, K)[1], test_queries)
    exact_latency, _ = single_query_ms(
        lambda q: faiss.knn(q, vectors, K, faiss.METRIC_INNER_PRODUCT)[1], test_queries[:EXACT_TIMED_QUERIES]
    )
    faiss.omp_set_num_threads(threads)

    figures = {
        "benchmark": "retrieval_index",
        "num_vectors": num_vectors,
        "dim": args.dim,
        "index": spec.factory,
        "params": spec.params,
        "budget_mb": round(budget / 1e6, 1),
        "build_s": round(build_s, 2),
        "tune_s": round(tune_s, 2),
        "memory_mb": round(index_bytes(index) / 1e6, 1),
        "p50_ms": round(float(np.percentile(latency, 50)), 3),
        "p99_ms": round(float(np.percentile(latency, 99)), 3),
        "recall_at_10": round(float(recall_per_query(found, truth).mean()), 4),
        "tuned_recall_at_10": round(spec.recall, 4),
        "exact_p50_ms": round(float(np.percentile(exact_latency, 50)), 3),
    }
    rows = [
        ["vectors", f"{num_vectors:,} × {args.dim}"],
        ["memory budget (MB)", figures["budget_mb"]],
        ["chosen index", spec.factory],
        ["why", spec.reason],
        ["tuned parameters", ", ".join(f"{name}={value}" for name, value in spec.params.items())],
        ["build (s)", build_s],
        ["tune (s)", tune_s],
        ["index memory (MB)", figures["memory_mb"]],
        ["p50 latency, 1 query, 1 thread (ms)", figures["p50_ms"]],
        ["p99 latency (ms)", figures["p99_ms"]],
        ["exact search p50 (ms)", figures["exact_p50_ms"]],
        [f"recall@10, {args.queries} held-out queries", figures["recall_at_10"]],
        ["recall@10 while tuning", figures["tuned_recall_at_10"]],
    ]
    report("Vector index: random unit vectors", ["figure", "value"], rows, figures)


if __name__ == "__main__":
    main()
