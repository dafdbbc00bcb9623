"""Re-identification ranking metrics with query and gallery sets: CMC rank-k and mean average precision.

Each query ranks the whole gallery by cosine similarity (normalised features, highest first, ties broken by
gallery order); rank-k is the fraction of queries with a gallery image of their identity among the first k;
AP is the mean of the precisions at the ranks of the query's matches (scikit-learn's average precision on
that ranking); mAP averages AP over the queries. As in CLIP-ReIdent's evaluation (Habel et al., MMSports 2022;
KonradHabel/clip_reid), without k-reciprocal re-ranking; query and gallery hold disjoint images, and no
same-camera filtering applies (the synthetic world has no cameras).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clipforge.errors import InputError
from clipforge.eval.metrics import ArrayLike, as_float_tensor


def reid_metrics(query: ArrayLike, query_ids: Sequence[int], gallery: ArrayLike, gallery_ids: Sequence[int],
                 ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``rank{k}`` for each k and ``map`` of queries [Q, D] against a gallery [G, D] (identity ids per row);
    every query must have at least one match in the gallery."""
    queries = F.normalize(as_float_tensor(query, "query", 2).double(), dim=-1)
    items = F.normalize(as_float_tensor(gallery, "gallery", 2).double(), dim=-1)
    q_ids, g_ids = torch.as_tensor(list(query_ids)), torch.as_tensor(list(gallery_ids))
    if len(q_ids) != len(queries) or len(g_ids) != len(items):
        raise InputError(f"ids: {len(q_ids)} query and {len(g_ids)} gallery ids for {len(queries)} and {len(items)} rows")
    matches = q_ids[:, None] == g_ids[None, :]
    if not bool(matches.any(dim=1).all()):
        raise InputError("gallery: some query identity has no gallery image (each needs at least two images)")
    order = (queries @ items.T).sort(dim=1, descending=True, stable=True).indices
    hits = matches.gather(1, order).double()  # [Q, G]: 1 where the ranked item matches
    first_hit = hits.argmax(dim=1)
    metrics = {f"rank{k}": (first_hit < k).double().mean().item() for k in ks}
    precision = hits.cumsum(dim=1) / torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)
    average_precision = (precision * hits).sum(dim=1) / hits.sum(dim=1)
    metrics["map"] = average_precision.mean().item()
    return metrics


def query_gallery_split(labels: Sequence[int], name: str = "identities") -> tuple[list[int], list[int]]:
    """Row indices of the queries (each identity's first image) and the gallery (its other images); at least two
    identities with two images each, else a one-line ``InputError`` naming ``name``."""
    counts = Counter(labels)
    if len(counts) < 2 or min(counts.values()) < 2:
        single = sum(count == 1 for count in counts.values())
        raise InputError(f"{name}: re-identification needs at least two identities with two images each "
                         f"(found {len(counts)} identities, {single} with one image)")
    first: dict[int, int] = {}
    for row, label in enumerate(labels):
        first.setdefault(label, row)
    queries = sorted(first.values())
    chosen = set(queries)
    return queries, [row for row in range(len(labels)) if row not in chosen]
