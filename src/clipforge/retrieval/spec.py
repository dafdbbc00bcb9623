"""Choosing a faiss index for N vectors of dimension d under a memory budget.

A port of autofaiss's selection rules (criteo/autofaiss ``autofaiss/indices/index_factory.py``,
``get_optimal_index_keys_v2``), re-tuned for CPU serving of L2-normalised CLIP embeddings with
the inner-product metric. The first rule that fits the budget wins:

1. ``Flat``: exact search, when N ≤ ``flat_max_vectors`` (default 2M; one exact query over
   1M × 512 takes about 65 ms on one core, so lower it when latency matters more than exactness)
   and N·4d bytes fit.
2. ``HNSW32,Flat`` (Malkov & Yashunin, arXiv 1603.09320), when its N·(4d + 8·32 + 24) bytes fit.
   Since it needs more memory than Flat, it is chosen only above ``flat_max_vectors``.
3. ``IVF{nlist},PQ{m}x4fs[,Refine(SQ…)]``: an inverted file (Jégou et al., TPAMI 2011) over 4-bit
   fast-scan product-quantisation codes (André et al., "Quicker ADC", 2019) that are scanned with
   SIMD lookups, then re-ranked with 16-, 8- or 4-bit scalar-quantised copies of the vectors. The
   most accurate (refine, m) pair that fits wins: fp16 refine with m = d/2, then 8-bit refine with
   m = d/2, d/4, d/8, then 4-bit refine with m = d/2, d/4, then PQ codes alone with m = d/2 … d/16.

``nlist`` is the power of two nearest √N: fast-scan codes are about 15× cheaper to scan than float32
vectors (measured on 1M × 512, one thread), so fewer, larger lists than the faiss wiki's 4–16·√N for
``IVF,Flat`` keep the per-list overhead low. Above 16,384 lists the coarse quantizer is itself an
HNSW32 graph (as in autofaiss). OPQ is not used: with a re-ranking stage it does not change the final
order, and training its rotation took 37 s at d = 64 and 340 s at d = 512 (m = 128, 65k points) on
two cores with faiss 1.15, longer than building the rest of a 1M-vector index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from clipforge.errors import ConfigError

GiB = 1 << 30
DEFAULT_MEMORY_BUDGET = 4 * GiB  # clip-retrieval's default ``max_index_memory_usage``
FLAT_MAX_VECTORS = 2_000_000
HNSW_M = 32
HNSW_BYTES_PER_VECTOR = 8 * HNSW_M + 24  # level-0 links (2M int32) + upper levels, offsets, levels
IVF_ID_BYTES = 8
TRAIN_POINTS_PER_LIST = 64
HNSW_QUANTIZER_MIN_LISTS = 16_384
FASTSCAN_BLOCK = 32  # fast-scan lists are stored in blocks of 32 codes
REFINE_BYTES_PER_DIM = {"SQfp16": 2.0, "SQ8": 1.0, "SQ4": 0.5, None: 0.0}
# (dimensions per PQ sub-quantizer, refine storage), most accurate first
QUANTIZED_CHOICES = (
    (2, "SQfp16"), (2, "SQ8"), (4, "SQ8"), (8, "SQ8"), (2, "SQ4"), (4, "SQ4"),
    (2, None), (4, None), (8, None), (16, None),
)


@dataclass(frozen=True)
class IndexSpec:
    """What to build: the faiss factory string, its search parameters and why it was chosen.

    ``params`` are faiss ``ParameterSpace`` names (``efSearch``, ``nprobe``, ``quantizer_efSearch``,
    ``k_factor_rf``); ``recall`` is recall@``recall_k`` measured by ``tune`` on held-out queries.
    """

    factory: str
    kind: str  # "flat" | "hnsw" | "ivfpq"
    dim: int
    num_vectors: int
    estimated_bytes: int
    reason: str
    params: dict[str, int] = field(default_factory=dict)
    train_size: int = 0
    recall: float | None = None
    recall_k: int | None = None
    target_recall: float | None = None

    @classmethod
    def from_dict(cls, data: dict) -> IndexSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def _format_bytes(size: float) -> str:
    """``size`` in the largest binary unit it reaches, so that small sizes do not print as 0.0."""
    if size >= GiB:
        return f"{size / GiB:.2f} GiB"
    if size >= 1 << 20:
        return f"{size / (1 << 20):.1f} MiB"
    return f"{size / (1 << 10):.1f} KiB" if size >= 1 << 10 else f"{size:.0f} B"


def flat_bytes(num_vectors: int, dim: int) -> int:
    return 4 * dim * num_vectors


def hnsw_bytes(num_vectors: int, dim: int) -> int:
    return (4 * dim + HNSW_BYTES_PER_VECTOR) * num_vectors


def ivf_num_lists(num_vectors: int) -> int:
    """The power of two nearest √N, between 1 and 65,536."""
    return 1 << min(16, max(0, round(math.log2(max(1.0, math.sqrt(num_vectors))))))


def ivfpq_bytes(num_vectors: int, dim: int, nlist: int, m: int, refine: str | None) -> int:
    """Codes, ids and refine copies per vector, plus centroids, PQ tables and fast-scan block padding."""
    per_vector = m // 2 + IVF_ID_BYTES + math.ceil(REFINE_BYTES_PER_DIM[refine] * dim)
    quantizer = nlist * (4 * dim + (HNSW_BYTES_PER_VECTOR if nlist >= HNSW_QUANTIZER_MIN_LISTS else 0))
    padding = nlist * FASTSCAN_BLOCK * (m // 2)
    pq_tables = 16 * dim * 4
    return num_vectors * per_vector + quantizer + padding + pq_tables


def _ivfpq_spec(num_vectors: int, dim: int, budget: int, rejected: str) -> IndexSpec:
    nlist = ivf_num_lists(num_vectors)
    quantizer = f"IVF{nlist}_HNSW{HNSW_M}" if nlist >= HNSW_QUANTIZER_MIN_LISTS else f"IVF{nlist}"
    choices = [
        (dim // per_subquantizer, refine, ivfpq_bytes(num_vectors, dim, nlist, dim // per_subquantizer, refine))
        for per_subquantizer, refine in QUANTIZED_CHOICES
        if dim % (2 * per_subquantizer) == 0  # m = dim / per_subquantizer must be a whole, even number
    ]
    fitting = [choice for choice in choices if choice[2] <= budget]
    if not fitting:
        raise ConfigError(
            f"memory budget {_format_bytes(budget)} is too small for {num_vectors:,} vectors of dim {dim} "
            f"(the smallest index needs about {_format_bytes(min(size for _, _, size in choices))})"
        )
    m, refine, size = fitting[0]
    nprobe = max(1, nlist // 16)
    params = {"nprobe": nprobe}
    if nlist >= HNSW_QUANTIZER_MIN_LISTS:
        params["quantizer_efSearch"] = 2 * nprobe
    if refine:
        params["k_factor_rf"] = 16
    ranking = f"re-ranked with {refine} copies" if refine else "no room to re-rank, so PQ caps the recall"
    reason = f"{rejected}; {m}×4-bit PQ codes in {nlist} lists, {ranking}: {_format_bytes(size)}"
    factory = f"{quantizer},PQ{m}x4fs" + (f",Refine({refine})" if refine else "")
    train_size = min(num_vectors, TRAIN_POINTS_PER_LIST * nlist)
    return IndexSpec(factory, "ivfpq", dim, num_vectors, size, reason, params, train_size)


def choose_index(
    num_vectors: int, dim: int, memory_budget_bytes: int, flat_max_vectors: int = FLAT_MAX_VECTORS
) -> IndexSpec:
    """The index to build for ``num_vectors`` × ``dim`` vectors in ``memory_budget_bytes`` (rules above)."""
    if num_vectors <= 0 or dim <= 0:
        raise ConfigError(f"cannot index {num_vectors} vectors of dimension {dim}")
    if dim % 4:
        raise ConfigError(f"dimension {dim} is not a multiple of 4, which 4-bit product quantisation needs")
    budget = _format_bytes(memory_budget_bytes)
    flat = flat_bytes(num_vectors, dim)
    if num_vectors <= flat_max_vectors and flat <= memory_budget_bytes:
        reason = f"exact: {num_vectors:,} ≤ {flat_max_vectors:,} vectors and {_format_bytes(flat)} fits {budget}"
        return IndexSpec("Flat", "flat", dim, num_vectors, flat, reason)
    hnsw = hnsw_bytes(num_vectors, dim)
    flat_rejected = (
        f"Flat needs {_format_bytes(flat)} > {budget}" if flat > memory_budget_bytes
        else f"{num_vectors:,} > {flat_max_vectors:,} vectors is too many to scan exactly"
    )
    if hnsw <= memory_budget_bytes:
        reason = f"{flat_rejected}; HNSW{HNSW_M} needs {_format_bytes(hnsw)} and fits {budget}"
        return IndexSpec(f"HNSW{HNSW_M},Flat", "hnsw", dim, num_vectors, hnsw, reason, {"efSearch": 64})
    rejected = f"{flat_rejected}; HNSW{HNSW_M} needs {_format_bytes(hnsw)} > {budget}"
    return _ivfpq_spec(num_vectors, dim, memory_budget_bytes, rejected)
