"""Embedding store, faiss index and search (clip-retrieval layout; autofaiss-style index choice).

    from clipforge.retrieval import SearchIndex
    SearchIndex.build("emb/", memory_budget=2 << 30)     # choose, build, tune, save emb/index/img/
    hits = SearchIndex("emb/").results(query_vector, k=10)  # [{"uid": ..., "path": ..., "id": 3, "score": 0.31}, ...]
"""

from clipforge.retrieval.faiss_index import (
    add_vectors,
    build_index,
    index_bytes,
    load_index,
    save_index,
)
from clipforge.retrieval.search import SearchIndex, index_dir
from clipforge.retrieval.spec import DEFAULT_MEMORY_BUDGET, IndexSpec, choose_index
from clipforge.retrieval.store import EmbeddingStore, write_part
from clipforge.retrieval.tuning import exact_search, recall_per_query, tune

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "EmbeddingStore",
    "IndexSpec",
    "SearchIndex",
    "add_vectors",
    "build_index",
    "choose_index",
    "exact_search",
    "index_bytes",
    "index_dir",
    "load_index",
    "recall_per_query",
    "save_index",
    "tune",
    "write_part",
]
