"""Curation algorithms against independent references: hand computations, numpy brute force, MetaCLIP's
formula and its per-entry sampling loop re-derived here, DataComp's subset format as numpy reads it."""

from __future__ import annotations

import numpy as np
import pytest

from clipforge.data.curate.balance import (
    Matcher,
    entry_counts,
    keep_probabilities,
    p_to_t,
    sample_kept,
    t_to_p,
)
from clipforge.data.curate.dedup import (
    exact_groups,
    first_of_groups,
    near_duplicate_groups,
    near_evaluation,
    similar_pairs,
)
from clipforge.data.curate.filters import (
    basic_filter,
    clip_score_filter,
    image_filter,
    nearest_centroid,
    text_filter,
)
from clipforge.data.curate.subset import in_subset, load_subset, save_subset
from clipforge.errors import ConfigError, InputError


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- subset files -------------------------------------------------------------------------------------


def test_subset_file_round_trips_as_datacomp_reads_it(tmp_path):
    uids = ["ffffffffffffffff0000000000000001", "0000000000000001ffffffffffffffff", "00000000000000010000000000000002",
            "0000000000000001ffffffffffffffff"]
    save_subset(tmp_path / "s.npy", uids)
    raw = np.load(tmp_path / "s.npy")  # what DataComp's resharder does
    assert raw.dtype == np.dtype("u8,u8")
    expected = [(1, 2), (1, 2**64 - 1), (2**64 - 1, 1)]  # hand-sorted, duplicate removed
    assert [tuple(map(int, row)) for row in raw.tolist()] == expected
    assert np.array_equal(load_subset(tmp_path / "s.npy"), raw)
    query = np.array([(1, 2), (1, 3), (2**64 - 1, 1), (0, 0)], dtype="u8,u8")
    assert in_subset(query, raw).tolist() == [True, False, True, False]


def test_subset_file_refuses_unsorted_and_bad_uids(tmp_path):
    np.save(tmp_path / "bad.npy", np.array([(2, 0), (1, 0)], dtype="u8,u8"))
    with pytest.raises(InputError, match="not sorted"):
        load_subset(tmp_path / "bad.npy")
    with pytest.raises(InputError, match="hexadecimal"):
        save_subset(tmp_path / "x.npy", ["xyz"])


# --- DataComp filters ---------------------------------------------------------------------------------


def test_basic_filter_by_hand():
    captions = ["a red star", "red star", "a b", "a long enough caption", None, "tall image here"]
    widths = np.array([200, 300, 300, 199, 300, 200])
    heights = np.array([600, 300, 300, 400, 300, 601])
    # 0: 3 words, 10 chars, side 200, aspect 3.0 -> keep; 1: 2 words; 2: too short; 3: side 199; 4: no caption;
    # 5: aspect 3.005
    assert basic_filter(captions, widths, heights).tolist() == [True, False, False, False, False, False]


def test_clip_score_top_fraction_and_threshold_by_hand():
    scores = np.array([0.1, 0.5, 0.3, np.nan, 0.4, 0.2, 0.3])
    # valid: 6 scores sorted descending 0.5 0.4 0.3 0.3 0.2 0.1; fraction 0.5 -> index int(6*0.5)=3 -> 0.3
    assert clip_score_filter(scores, fraction=0.5).tolist() == [False, True, True, False, True, False, True]
    assert clip_score_filter(scores, threshold=0.35).tolist() == [False, True, False, False, True, False, False]
    with pytest.raises(ConfigError):
        clip_score_filter(scores)


def test_text_filter_whole_tokens():
    captions = ["A Red star.", "a redstar", "blue square", None, "a big red circle"]
    assert text_filter(captions, ["red", "square"]).tolist() == [True, False, True, False, True]
    assert text_filter(captions, ["red circle"]).tolist() == [False, False, False, False, True]


def test_image_filter_keeps_the_target_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:4] * 10
    labels = np.repeat(np.arange(4), 50)
    pool = centres[labels] + rng.normal(0, 0.1, (200, 8)).astype(np.float32)
    targets = centres[[1, 3]] + rng.normal(0, 0.1, (2, 8)).astype(np.float32)
    keep = image_filter(pool, targets, clusters=4)
    assert np.array_equal(keep, np.isin(labels, [1, 3]))


def test_nearest_centroid_matches_numpy():
    rng = np.random.default_rng(1)
    x, c = unit_rows(rng, 300, 16), unit_rows(rng, 7, 16)
    assert np.array_equal(nearest_centroid(x, c), np.argmax(x @ c.T, axis=1))


# --- MetaCLIP balancing -------------------------------------------------------------------------------


def reference_matches(text: str, entries: list[str]) -> list[int]:
    """MetaCLIP's substr_matching loop, written out: pad, space out punctuation, then `" e " in text`."""
    text = " " + text + " "
    for mark in [",", ".", ";", ":", "?", "!", "`"]:
        text = text.replace(mark, " " + mark + " ")
    text = text.replace("\t", " ").replace("\n", " ").replace("\r", " ")
    return sorted({entries.index(e) for e in entries if " " + e + " " in text})


def test_substring_matching_follows_metaclip_rules():
    entries = ["red", "red star", "star", "The", "the", "New York", "a"]
    texts = ["a red star.", "The star,and the moon", "redstar", "New York?", "new york", "a\tred", "", "stars"]
    matcher = Matcher(entries)
    for text in texts:
        assert matcher.match(text) == reference_matches(text, entries), text


def test_keep_probability_equals_the_formula():
    entries = ["red", "star", "blue", "square"]
    matches = Matcher(entries).match_all(["red star"] * 6 + ["blue star"] * 2 + ["red square"] + ["green"])
    counts = entry_counts(matches, 4)
    assert counts.tolist() == [7, 8, 2, 1]
    t = 4
    p_red, p_star = 4 / 7, 4 / 8  # blue, square: tail entries keep everything
    expected = [1 - (1 - p_red) * (1 - p_star)] * 6 + [1.0] * 2 + [1.0] + [0.0]
    assert np.allclose(keep_probabilities(matches, counts, t), expected)


def test_per_pair_draw_has_metaclip_per_entry_loop_distribution():
    """facebookresearch/MetaCLIP balance_sampling: for each matched entry, keep if random() < t/count; break."""
    entries = ["red", "star", "blue"]
    matches = [[0, 1], [0], [1, 2], [0, 1, 2]]
    counts = np.array([40, 25, 5], dtype=np.uint64)
    t = 10
    rng = np.random.default_rng(7)
    trials = 20000
    entry_count = counts.astype(np.float64).copy()
    entry_count[entry_count < t] = t
    entry_prob = t / entry_count
    reference = np.zeros(len(matches))
    for _ in range(trials):
        for row, matched in enumerate(matches):
            for entry in matched:
                if rng.random() < entry_prob[entry]:
                    reference[row] += 1
                    break
    ours = np.mean([sample_kept(keep_probabilities(matches, counts, t), seed, 0) for seed in range(trials)], axis=0)
    assert np.allclose(ours, reference / trials, atol=0.015)
    assert entries  # the entries only name the columns


def test_sampling_is_seeded_per_shard():
    p = np.full(1000, 0.3)
    assert np.array_equal(sample_kept(p, 5, 2), sample_kept(p, 5, 2))
    assert not np.array_equal(sample_kept(p, 5, 2), sample_kept(p, 5, 3))


def test_tail_share_and_its_inverse_by_hand():
    counts = np.array([1, 2, 3, 10, 84], dtype=np.uint64)  # 100 matches in all
    assert t_to_p(counts, 4) == pytest.approx(0.06)  # 1 + 2 + 3 below 4
    assert t_to_p(counts, 3) == pytest.approx(0.03)
    assert p_to_t(counts, 0.06) == 10  # smallest observed count whose tail (counts < t) holds >= 6%
    assert p_to_t(counts, 0.16) == 84


# --- deduplication --------------------------------------------------------------------------------------


def test_exact_groups_keep_first():
    hashes = ["a", "b", "a", "c", "b", "a"]
    groups = exact_groups(hashes)
    assert groups.tolist() == [0, 1, 0, 3, 1, 0]
    assert first_of_groups(groups).tolist() == [True, True, False, True, False, False]


def test_similar_pairs_match_numpy_brute_force():
    rng = np.random.default_rng(2)
    x, y = unit_rows(rng, 120, 12), unit_rows(rng, 80, 12)
    rows, cols = similar_pairs(x, y, 0.5)
    expected = set(zip(*np.nonzero(x @ y.T >= 0.5)))
    assert set(zip(rows.tolist(), cols.tolist())) == {(int(a), int(b)) for a, b in expected}


def test_near_duplicate_groups_find_every_planted_copy():
    rng = np.random.default_rng(3)
    base = unit_rows(rng, 200, 64)
    sources = rng.choice(200, 60, replace=False)
    copies = base[sources] + rng.normal(0, 0.01, (60, 64)).astype(np.float32)
    pool = np.concatenate([base, copies / np.linalg.norm(copies, axis=1, keepdims=True)])
    groups = near_duplicate_groups(pool, 0.95)
    keep = first_of_groups(groups)
    # Union-find over the brute-force edge list, written here.
    parent = list(range(len(pool)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(*np.nonzero(pool @ pool.T >= 0.95)):
        parent[find(int(a))] = find(int(b))
    roots = [find(i) for i in range(len(pool))]
    assert all((groups[i] == groups[j]) == (roots[i] == roots[j]) for i in range(0, 260, 7) for j in range(len(pool)))
    assert np.all(groups[200 + np.arange(60)] == sources)  # every planted copy joins its source
    assert keep[:200].all() and not keep[200:].any()


def test_near_evaluation_flags_copies_of_test_images():
    rng = np.random.default_rng(4)
    pool, evaluation = unit_rows(rng, 100, 32), unit_rows(rng, 10, 32)
    pool[[5, 50]] = evaluation[[2, 7]]
    assert np.flatnonzero(near_evaluation(pool, evaluation, 0.9)).tolist() == [5, 50]
