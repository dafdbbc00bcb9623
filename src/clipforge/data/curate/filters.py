"""DataComp's filtering baselines on arrays of pool metadata (Gadre et al., "DataComp: In search of the next
generation of multimodal datasets", NeurIPS 2023 Datasets and Benchmarks; mlfoundations/datacomp
``baselines/apply_filter.py``). Each filter returns a boolean keep mask over the pool; intersect masks with ``&``.

What differs from DataComp's code: the basic filter has no fasttext language id (it is language-agnostic,
as the issue asks); the text filter matches a user's concept list instead of WordNet synsets of
ImageNet-21k; k-means runs on CPU faiss with a user-set number of clusters (DataComp: 100k on GPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipforge.errors import ConfigError

BASIC_MIN_WORDS = 3  # len(text.split()) > 2
BASIC_MIN_CHARS = 6  # len(text) > 5
BASIC_MIN_SIDE = 200
BASIC_MAX_ASPECT = 3.0


def basic_filter(
    captions: Sequence[str | None],
    widths: np.ndarray,
    heights: np.ndarray,
    *,
    min_words: int = BASIC_MIN_WORDS,
    min_chars: int = BASIC_MIN_CHARS,
    min_side: int = BASIC_MIN_SIDE,
    max_aspect: float = BASIC_MAX_ASPECT,
) -> np.ndarray:
    """Caption of ≥ ``min_words`` whitespace words and ≥ ``min_chars`` characters; image with shorter side
    ≥ ``min_side`` and aspect ratio ≤ ``max_aspect`` (DataComp ``basic_filter`` without language id)."""
    widths, heights = np.asarray(widths, dtype=np.float64), np.asarray(heights, dtype=np.float64)
    words = np.array([len(text.split()) if text else 0 for text in captions])
    chars = np.array([len(text) if text else 0 for text in captions])
    short, long = np.minimum(widths, heights), np.maximum(widths, heights)
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.where(short > 0, long / short, np.inf)
    return (words >= min_words) & (chars >= min_chars) & (short >= min_side) & (aspect <= max_aspect)


def clip_score_threshold(scores: np.ndarray, fraction: float) -> float:
    """The pool-wide score above which the top ``fraction`` lies: DataComp's ``-sort(-scores)[int(N*f)]``."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"CLIP score fraction {fraction} is not in (0, 1]")
    ordered = -np.sort(-np.asarray(scores, dtype=np.float64))
    return float(ordered[min(int(len(ordered) * fraction), len(ordered) - 1)])


def clip_score_filter(scores: np.ndarray, *, fraction: float | None = None, threshold: float | None = None) -> np.ndarray:
    """Keep ``score >= threshold``, the threshold given or taken as the pool's top-``fraction`` quantile.

    Scores are NaN for samples that could not be scored (unreadable image or caption): never kept.
    """
    if (fraction is None) == (threshold is None):
        raise ConfigError("CLIP score filter: give exactly one of fraction and threshold")
    scores = np.asarray(scores, dtype=np.float64)
    if threshold is None:
        valid = scores[~np.isnan(scores)]
        if len(valid) == 0:
            return np.zeros(len(scores), dtype=bool)
        threshold = clip_score_threshold(valid, fraction)
    with np.errstate(invalid="ignore"):
        return scores >= threshold


def text_filter(captions: Sequence[str | None], concepts: Sequence[str]) -> np.ndarray:
    """Captions with a whitespace token (lower-cased, surrounding punctuation stripped) naming one of ``concepts``
    (DataComp's text-based baseline matches tokens against ImageNet-21k synsets; here the list is the user's)."""
    wanted = {concept.lower() for concept in concepts}
    if not wanted:
        raise ConfigError("text filter: the concept list is empty")
    multi_word = [concept for concept in wanted if " " in concept]

    def matches(text: str | None) -> bool:
        if not text:
            return False
        lowered = text.lower()
        tokens = {token.strip(".,;:!?\"'()[]") for token in lowered.split()}
        return bool(tokens & wanted) or any(f" {concept} " in f" {lowered} " for concept in multi_word)

    return np.array([matches(text) for text in captions], dtype=bool)


def kmeans_centroids(embeddings: np.ndarray, clusters: int, *, iterations: int = 20, seed: int = 0) -> np.ndarray:
    """faiss k-means on the pool's image embeddings (DataComp: 20 iterations, no sub-sampling of points)."""
    import faiss

    data = np.ascontiguousarray(embeddings, dtype=np.float32)
    if not 1 <= clusters <= len(data):
        raise ConfigError(f"image filter: {clusters} clusters for {len(data)} embeddings")
    kmeans = faiss.Kmeans(data.shape[1], clusters, niter=iterations, seed=seed, max_points_per_centroid=len(data), verbose=False)
    kmeans.train(data)
    return kmeans.centroids


def nearest_centroid(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each embedding's nearest centroid by dot product (DataComp assigns by argmax of the inner product)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index.search(np.ascontiguousarray(embeddings, dtype=np.float32), 1)[1][:, 0]


def image_filter(pool: np.ndarray, targets: np.ndarray, clusters: int, *, seed: int = 0) -> np.ndarray:
    """Keep pool images whose nearest k-means centroid is the nearest centroid of some target image
    (DataComp's image-based baseline, targets = ImageNet training images there)."""
    centroids = kmeans_centroids(pool, clusters, seed=seed)
    hit = np.unique(nearest_centroid(targets, centroids))
    return np.isin(nearest_centroid(pool, centroids), hit)
