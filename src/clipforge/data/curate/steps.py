"""The curation steps on a scanned pool: each decides a keep mask on the driver from the per-shard outputs,
then writes ``decisions.parquet`` (one row per pool sample: uid, shard, key, caption, error, the step's own
columns and ``kept``), ``subset.npy`` (DataComp's subset file of the kept uids) and ``summary.json`` (per
criterion, the input samples it passes and drops on its own; a sample can fail several), each atomically.
``--subset`` restricts a step to the output of an earlier one, so steps chain (filter → dedup → balance,
MetaCLIP's order: balancing last).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge._util.fileio import atomic_path
from clipforge.data.curate import balance, dedup, filters
from clipforge.data.curate.subset import in_subset, save_subset, uid_pairs
from clipforge.errors import ConfigError

DECISIONS, SUBSET, SUMMARY = "decisions.parquet", "subset.npy", "summary.json"


@dataclass(frozen=True)
class Decision:
    """A step's outcome over the pool: its ``decisions.parquet`` columns (``kept`` last), each criterion's pass
    mask (``kept`` is the input samples passing all of them) and the summary's own figures."""

    columns: dict[str, Any]
    criteria: dict[str, np.ndarray]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FilterSettings:
    """DataComp's baselines; every one given applies, and a sample must pass all of them (intersection)."""

    basic: bool = False
    min_words: int = filters.BASIC_MIN_WORDS
    min_chars: int = filters.BASIC_MIN_CHARS
    min_side: int = filters.BASIC_MIN_SIDE
    max_aspect: float = filters.BASIC_MAX_ASPECT
    clip_fraction: float | None = None
    clip_threshold: float | None = None
    text_concepts: tuple[str, ...] = ()
    image_clusters: int | None = None
    seed: int = 0

    @property
    def needs_embeddings(self) -> bool:
        return self.clip_fraction is not None or self.clip_threshold is not None or self.image_clusters is not None

    def check(self) -> None:
        if not (self.basic or self.needs_embeddings or self.text_concepts):
            raise ConfigError("curate filter: choose at least one filter (--basic, --clip-fraction/--clip-threshold, --text-concepts, --image-targets)")
        if self.clip_fraction is not None and self.clip_threshold is not None:
            raise ConfigError("curate filter: --clip-fraction and --clip-threshold exclude each other")


def input_mask(pool: pa.Table, subset: np.ndarray | None) -> np.ndarray:
    """Readable samples (no ``error``) that are in ``subset`` when one is given."""
    readable = np.array([error is None for error in pool.column("error").to_pylist()], dtype=bool)
    if subset is None:
        return readable
    return readable & in_subset(uid_pairs(pool.column("uid").to_pylist()), subset)


def clip_scores(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Cosine similarity of each (image, caption) pair of unit vectors; NaN where either is missing."""
    return np.einsum("nd,nd->n", image.astype(np.float64), text.astype(np.float64))


def filter_pool(
    pool: pa.Table,
    settings: FilterSettings,
    active: np.ndarray,
    image: np.ndarray | None = None,
    text: np.ndarray | None = None,
    targets: np.ndarray | None = None,
) -> Decision:
    """One mask per criterion (all over the whole pool) and ``kept``, their intersection with ``active``."""
    settings.check()
    captions = pool.column("caption").to_pylist()
    masks: dict[str, np.ndarray] = {}
    if settings.basic:
        masks["basic"] = filters.basic_filter(
            captions, pool.column("width").to_numpy(zero_copy_only=False), pool.column("height").to_numpy(zero_copy_only=False),
            min_words=settings.min_words, min_chars=settings.min_chars, min_side=settings.min_side, max_aspect=settings.max_aspect)
    if settings.clip_fraction is not None or settings.clip_threshold is not None:
        if image is None or text is None:
            raise ConfigError("curate filter: the CLIP score filter needs image and caption embeddings (--model)")
        scores = np.where(active, clip_scores(image, text), np.nan)
        masks["clip_score"] = filters.clip_score_filter(scores, fraction=settings.clip_fraction, threshold=settings.clip_threshold)
    if settings.text_concepts:
        masks["text"] = filters.text_filter(captions, settings.text_concepts)
    if settings.image_clusters is not None:
        if image is None or targets is None:
            raise ConfigError("curate filter: the image filter needs pool embeddings (--model) and target images (--image-targets)")
        rows = np.flatnonzero(active)
        hit = filters.image_filter(image[rows], targets, settings.image_clusters, seed=settings.seed)
        masks["image"] = np.zeros(len(pool), dtype=bool)
        masks["image"][rows[hit]] = True
    kept = np.logical_and.reduce([active, *masks.values()])
    columns = {"score": clip_scores(image, text)} if image is not None and text is not None else {}
    return Decision({**columns, **masks, "kept": kept}, masks)


def balance_pool(pool: pa.Table, entries: Sequence[str], active: np.ndarray, *, t: float | None, tail_share: float, seed: int) -> Decision:
    """MetaCLIP balancing of the active samples: columns (matched entries, probability, kept), the criteria
    ``matched`` (a metadata entry matches) and ``balanced`` (not dropped by the draw) and the summary's figures."""
    matcher = balance.Matcher(entries)
    captions = pool.column("caption").to_pylist()
    matches = [matcher.match(text) if on else [] for text, on in zip(captions, active)]
    counts = balance.entry_counts(matches, len(matcher.entries))
    t_used = float(t) if t is not None else float(balance.p_to_t(counts, tail_share))
    probabilities = balance.keep_probabilities(matches, counts, t_used)
    shards = pool.column("shard").to_numpy()
    kept = np.zeros(len(pool), dtype=bool)
    for shard in np.unique(shards):
        rows = np.flatnonzero(shards == shard)
        kept[rows] = balance.sample_kept(probabilities[rows], seed, int(shard))
    kept &= active
    matched = np.array([bool(m) for m in matches], dtype=bool)
    columns = {"matched": [[matcher.entries[e] for e in m] for m in matches], "keep_probability": probabilities, "kept": kept}
    summary = {"t": t_used, "tail_share": balance.t_to_p(counts, t_used), "matched": int(matched.sum()),
               "entry_counts": {entry: int(count) for entry, count in zip(matcher.entries, counts)}}
    return Decision(columns, {"matched": matched, "balanced": kept | ~matched}, summary)


def dedup_pool(pool: pa.Table, active: np.ndarray, image: np.ndarray | None, *, threshold: float | None,
               evaluation: np.ndarray | None, evaluation_threshold: float) -> Decision:
    """Exact groups (SHA-256 of the image bytes), near-duplicate groups (cosine ≥ threshold) and evaluation-set
    near-duplicates among the active samples; ``kept``: first of each group, not near an evaluation image. The
    criteria: ``exact_duplicate``, ``near_duplicate`` (first of its group) and ``near_evaluation`` (not near)."""
    rows = np.flatnonzero(active)
    hashes = pool.column("sha256").to_pylist()
    exact = np.full(len(pool), -1, dtype=np.int64)
    exact[rows] = rows[dedup.exact_groups([hashes[row] for row in rows])]
    criteria = {"exact_duplicate": np.zeros(len(pool), dtype=bool)}
    criteria["exact_duplicate"][rows] = dedup.first_of_groups(exact[rows])
    columns = {"exact_group": exact}
    if threshold is not None or evaluation is not None:
        if image is None:
            raise ConfigError("curate dedup: near-duplicate detection needs image embeddings (--model)")
    if threshold is not None:
        near = np.full(len(pool), -1, dtype=np.int64)
        near[rows] = rows[dedup.near_duplicate_groups(image[rows], threshold)]
        columns["near_group"] = near
        criteria["near_duplicate"] = np.zeros(len(pool), dtype=bool)
        criteria["near_duplicate"][rows] = dedup.first_of_groups(near[rows])
    if evaluation is not None:
        flagged = np.zeros(len(pool), dtype=bool)
        flagged[rows] = dedup.near_evaluation(image[rows], evaluation, evaluation_threshold)
        columns["near_evaluation"] = flagged
        criteria["near_evaluation"] = ~flagged
    kept = np.logical_and.reduce([active, *criteria.values()])
    return Decision({**columns, "kept": kept}, criteria, {"threshold": threshold})


def write_step(out: Path, step: str, pool: pa.Table, active: np.ndarray, decision: Decision, settings: Any = None) -> dict[str, Any]:
    """decisions.parquet, subset.npy and summary.json of a step."""
    table = pool.append_column("input", pa.array(active))
    for name, values in decision.columns.items():
        table = table.append_column(name, pa.array(values.tolist() if isinstance(values, np.ndarray) else values))
    with atomic_path(out / DECISIONS) as tmp:
        pq.write_table(table, tmp)
    kept = np.asarray(decision.columns["kept"], dtype=bool)
    uids = pool.column("uid").to_pylist()
    save_subset(out / SUBSET, [uid for uid, keep in zip(uids, kept) if keep])
    errors = [error for error in pool.column("error").to_pylist() if error is not None]
    reasons: dict[str, int] = {}
    for error in errors:
        reason = error.split(" (")[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    summary = {
        "step": step,
        "settings": asdict(settings) if settings is not None else None,
        "pool": len(pool),
        "unreadable": len(errors),
        "unreadable_reasons": reasons,
        "input": int(active.sum()),
        "passed": {name: int((mask & active).sum()) for name, mask in decision.criteria.items()},
        "dropped": {name: int((~mask & active).sum()) for name, mask in decision.criteria.items()},
        "kept": int(kept.sum()),
        **decision.extra,
    }
    with atomic_path(out / SUMMARY) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary
