"""MetaCLIP balancing (Xu et al., "Demystifying CLIP Data", ICLR 2024; facebookresearch/MetaCLIP
``metaclip/substr_matching.py``, ``metaclip/balancing.py``, ``metaclip/curation/curate.py``).

1. Substring matching: a caption is normalised (padded with spaces, each of ``, . ; : ? ! ` `` surrounded by
   spaces, ``\\t \\n \\r`` turned into spaces) and matches entry ``e`` when ``" " + e + " "`` is a substring:
   whole words, case-sensitive. Here the spans of the caption's space-separated pieces are looked up in a
   set instead of MetaCLIP's Aho-Corasick automaton; both find exactly the entries whose padded text occurs.
2. Counts: the number of captions matching each entry over the whole pool.
3. Balancing: entry ``e`` keeps a caption with probability ``t / max(count[e], t)``; a pair is kept when any
   of its matched entries keeps it, i.e. with probability ``1 − ∏ (1 − t / max(count[e], t))``; unmatched
   pairs are dropped. MetaCLIP draws one number per (pair, entry) and stops at the first success; here
   one uniform number per pair is compared with that probability, the same distribution. The draws of
   shard ``s`` come from ``SeedSequence([seed, s])``, so a shard's result never depends on the others or on
   which worker ran it.
4. ``t`` for a small pool: ``p_to_t(counts, tail_share)`` (MetaCLIP's curate.py), the ``t`` at which entries
   with fewer than ``t`` matches hold ``tail_share`` of all matches (6% for t = 20k on their 1.6B pool).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipforge.errors import ConfigError

PUNCTUATION = (",", ".", ";", ":", "?", "!", "`")
DEFAULT_TAIL_SHARE = 0.06


def normalize(text: str) -> str:
    """MetaCLIP's caption normalisation before matching."""
    text = f" {text} "
    for mark in PUNCTUATION:
        text = text.replace(mark, f" {mark} ")
    for space in ("\t", "\n", "\r"):
        text = text.replace(space, " ")
    return text


class Matcher:
    """Which metadata entries a caption matches (whole words, case-sensitive)."""

    def __init__(self, entries: Sequence[str]) -> None:
        self.entries = list(entries)
        if not self.entries:
            raise ConfigError("balancing: the metadata list is empty")
        self._ids: dict[str, int] = {}
        for number, entry in enumerate(self.entries):
            if entry != entry.strip() or not entry:
                raise ConfigError(f"balancing: metadata entry {entry!r} is blank or has surrounding spaces")
            self._ids.setdefault(entry, number)
        self._longest = max(len(entry.split(" ")) for entry in self.entries)

    def match(self, text: str | None) -> list[int]:
        """Sorted ids of the entries ``text`` matches (an entry listed twice matches under its first id)."""
        if not text:
            return []
        pieces = normalize(text).split(" ")
        found = set()
        for start in range(len(pieces)):
            for stop in range(start + 1, min(start + self._longest, len(pieces)) + 1):
                number = self._ids.get(" ".join(pieces[start:stop]))
                if number is not None:
                    found.add(number)
        return sorted(found)

    def match_all(self, texts: Sequence[str | None]) -> list[list[int]]:
        return [self.match(text) for text in texts]


def entry_counts(matches: Sequence[Sequence[int]], num_entries: int) -> np.ndarray:
    """Matches per entry over the pool (uint64, as MetaCLIP accumulates them)."""
    flat = np.fromiter((entry for entries in matches for entry in entries), dtype=np.int64)
    return np.bincount(flat, minlength=num_entries).astype(np.uint64)


def t_to_p(counts: np.ndarray, t: float) -> float:
    """Share of all matches held by tail entries (count < t)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return float(counts[counts < t].sum() / total) if total else 0.0


def p_to_t(counts: np.ndarray, tail_share: float = DEFAULT_TAIL_SHARE) -> int:
    """The smallest ``t`` (an entry count) whose tail share ``t_to_p(counts, t)`` reaches ``tail_share``."""
    if not 0.0 < tail_share <= 1.0:
        raise ConfigError(f"balancing: tail share {tail_share} is not in (0, 1]")
    candidates = np.unique(np.asarray(counts, dtype=np.int64)[np.asarray(counts) > 0])
    if len(candidates) == 0:
        raise ConfigError("balancing: no caption matches any metadata entry")
    for t in np.append(candidates, candidates[-1] + 1):
        if t_to_p(counts, float(t)) >= tail_share:
            return int(t)
    return int(candidates[-1] + 1)


def entry_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """``t / max(count, t)``: 1 for tail entries, ``t / count`` for head entries."""
    if t <= 0:
        raise ConfigError(f"balancing: t = {t} must be positive")
    return t / np.maximum(np.asarray(counts, dtype=np.float64), t)


def keep_probabilities(matches: Sequence[Sequence[int]], counts: np.ndarray, t: float) -> np.ndarray:
    """``1 − ∏_{e ∈ matched} (1 − t / max(count[e], t))`` per pair (0 for a pair matching nothing)."""
    entry_keep = entry_probabilities(counts, t)
    return np.array([1.0 - np.prod(1.0 - entry_keep[list(entries)]) if entries else 0.0 for entries in matches])


def sample_kept(probabilities: np.ndarray, seed: int, shard: int) -> np.ndarray:
    """Keep mask of one shard's pairs, drawn from ``SeedSequence([seed, shard])``."""
    draws = np.random.default_rng(np.random.SeedSequence([seed, shard])).random(len(probabilities))
    return draws < probabilities
