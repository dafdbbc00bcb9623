"""Embedding store, index choice, build/tune/save/load and search, checked against numpy brute force."""

from __future__ import annotations

import re

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipforge.errors import ConfigError, InputError
from clipforge.retrieval import (
    EmbeddingStore,
    SearchIndex,
    build_index,
    choose_index,
    index_bytes,
    load_index,
    save_index,
    tune,
    write_part,
)
from clipforge.retrieval.spec import GiB

DIM = 32


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """Single-threaded faiss: deterministic HNSW builds, and no OpenMP spin-waiting on a busy machine."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def unit_vectors(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, in float64 numpy."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, candidates, axis=1), axis=1)
    ids = np.take_along_axis(candidates, order, axis=1)
    return np.take_along_axis(scores, ids, axis=1), ids


def mean_recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def metadata_table(uids: list[str]) -> pa.Table:
    return pa.table({"uid": uids, "path": [f"images/{uid}.jpg" for uid in uids]})


def write_store(root, rng: np.random.Generator, sizes: list[int], d: int = DIM) -> dict[str, np.ndarray]:
    """Parts 0..len(sizes)-1 with img and text vectors; returns what a reader should see (float16-rounded)."""
    written = {"img": [], "text": []}
    for part, size in enumerate(sizes):
        uids = [f"p{part}r{row}" for row in range(size)]
        for kind in written:
            vectors = unit_vectors(rng, size, d)
            write_part(root, kind, part, vectors, metadata_table(uids) if kind == "img" else None)
            written[kind].append(vectors.astype(np.float16).astype(np.float32))
    return {kind: np.concatenate(parts) for kind, parts in written.items()}


# --- store -----------------------------------------------------------------------------------------------


def test_store_reads_parts_in_numeric_order_with_aligned_metadata(tmp_path):
    rng = np.random.default_rng(0)
    # 12 parts, so "10" and "11" must sort after "9"; part 1 spans three parquet row groups
    sizes = [3, 40_000, 7, 1, 5, 2, 4, 6, 3, 2, 9, 8]
    expected = write_store(tmp_path, rng, sizes, d=8)
    store = EmbeddingStore(tmp_path)
    assert [part.index for part in store.parts] == list(range(12))
    assert (store.num_vectors, store.dim, store.kinds) == (sum(sizes), 8, ("img", "text"))
    for kind in ("img", "text"):
        np.testing.assert_array_equal(store.load_embeddings(kind), expected[kind])
        np.testing.assert_array_equal(store.load_embeddings(kind, mmap=False), expected[kind])
        streamed = np.concatenate([array for _, array in store.iter_parts(kind)])
        np.testing.assert_array_equal(streamed.astype(np.float32), expected[kind])
    uids = [f"p{part}r{row}" for part, size in enumerate(sizes) for row in range(size)]
    rows = np.array([sum(sizes) - 1, 5, 3, 40_002, 3, 0, 36_000, 17_000])
    assert store.metadata(rows) == [{"uid": uids[r], "path": f"images/{uids[r]}.jpg"} for r in rows]
    with pytest.raises(InputError, match="out of range"):
        store.metadata(np.array([sum(sizes)]))


def test_store_missing_metadata_part_is_a_one_line_error_naming_the_file(tmp_path):
    write_store(tmp_path, np.random.default_rng(0), [4, 4, 4, 4])
    (tmp_path / "metadata" / "metadata_3.parquet").unlink()
    with pytest.raises(InputError) as error:
        EmbeddingStore(tmp_path)
    assert "metadata_3.parquet" in str(error.value) and "\n" not in str(error.value)


def test_store_row_count_mismatch_is_a_one_line_error_naming_the_files(tmp_path):
    write_store(tmp_path, np.random.default_rng(0), [4, 5, 6])
    pq.write_table(metadata_table(["a", "b"]), tmp_path / "metadata" / "metadata_1.parquet")
    with pytest.raises(InputError) as error:
        EmbeddingStore(tmp_path)
    message = str(error.value)
    assert "img_emb_1.npy" in message and "metadata_1.parquet" in message and "\n" not in message


def test_store_dimension_mismatch_and_missing_kind_part_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    write_store(tmp_path, rng, [4, 5])
    write_part(tmp_path, "img", 2, unit_vectors(rng, 3, DIM + 4), metadata_table(["a", "b", "c"]))
    with pytest.raises(InputError, match="img_emb_2.npy"):
        EmbeddingStore(tmp_path)
    write_part(tmp_path, "img", 2, unit_vectors(rng, 3), None)
    with pytest.raises(InputError, match="text_emb_2.npy"):
        EmbeddingStore(tmp_path)


def test_write_part_rejects_bad_input(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="norm"):
        write_part(tmp_path, "img", 0, 2 * unit_vectors(rng, 3), metadata_table(["a", "b", "c"]))
    with pytest.raises(InputError, match="uid"):
        write_part(tmp_path, "img", 0, unit_vectors(rng, 2), pa.table({"path": ["x", "y"]}))
    with pytest.raises(InputError, match="2 metadata rows for 3"):
        write_part(tmp_path, "img", 0, unit_vectors(rng, 3), metadata_table(["a", "b"]))
    assert not any(tmp_path.rglob("*"))


def test_failed_writes_leave_no_partial_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    write_part(tmp_path, "img", 0, unit_vectors(rng, 3), metadata_table(["a", "b", "c"]))
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}

    def save_then_fail(handle, array):
        handle.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_part(tmp_path, "img", 0, unit_vectors(rng, 3), metadata_table(["d", "e", "f"]))
    with pytest.raises(OSError, match="disk full"):
        write_part(tmp_path, "img", 1, unit_vectors(rng, 2), metadata_table(["g", "h"]))
    monkeypatch.undo()

    def write_table_then_fail(table, where, **kwargs):
        open(where, "wb").write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", write_table_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_part(tmp_path, "text", 0, unit_vectors(rng, 3), metadata_table(["d", "e", "f"]))
    after = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    new_files = set(after) - set(before) - {tmp_path / "text_emb" / "text_emb_0.npy"}
    assert not new_files  # no temporary leftovers, no img part 1, no half-written metadata
    assert {path: after[path] for path in before} == before  # the earlier parts are untouched


# --- index choice ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_vectors", "dim", "budget", "factory"),
    [
        (100_000, 512, 1 * GiB, "Flat"),  # 4·512·1e5 = 205 MB fits, and 1e5 ≤ 2M
        (3_000_000, 512, 8 * GiB, "HNSW32,Flat"),  # > 2M; (2048 + 280)·3e6 = 6.98 GB ≤ 8.59 GB
        (1_000_000, 512, 1 * GiB, "IVF1024,PQ256x4fs,Refine(SQ8)"),  # fp16 refine needs 1160 B/vec > 1074
        (3_000_000, 512, 4 * GiB, "IVF2048,PQ256x4fs,Refine(SQfp16)"),  # 1160 B/vec·3e6 = 3.5 GB ≤ 4.29 GB
        (1_000_000, 512, GiB // 2, "IVF1024,PQ256x4fs,Refine(SQ4)"),  # 128 + 8 + 256 B/vec
        (100_000_000, 512, 8 * GiB, "IVF8192,PQ128x4fs"),  # 86 B/vec: only 64-byte codes + 8-byte ids fit
        (300_000_000, 512, 32 * GiB, "IVF16384_HNSW32,PQ128x4fs"),  # √3e8 ≈ 17,321 → 2^14 lists, HNSW quantizer
    ],
)
def test_choose_index_picks_the_tier_that_fits(num_vectors, dim, budget, factory):
    spec = choose_index(num_vectors, dim, budget)
    assert spec.factory == factory
    assert spec.estimated_bytes <= budget


def test_choose_index_respects_flat_limit_and_rejects_impossible_budgets():
    assert choose_index(50_000, 64, GiB, flat_max_vectors=10_000).factory == "HNSW32,Flat"
    with pytest.raises(ConfigError) as error:
        choose_index(100_000_000, 512, GiB)
    assert "too small" in str(error.value) and "\n" not in str(error.value)


def test_a_budget_too_small_prints_sizes_that_show_the_numbers():
    with pytest.raises(ConfigError) as error:
        choose_index(200, 128, 1000)
    units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": GiB}
    budget, needed = [float(number) * units[unit] for number, unit in re.findall(r"([\d.]+) (B|KiB|MiB|GiB)\b", str(error.value))]
    assert budget == 1000
    choose_index(200, 128, int(needed * 1.01))  # the size it asks for (to its printed precision) is enough
    with pytest.raises(ConfigError):
        choose_index(200, 128, int(needed * 0.99))


# --- build, tune, search -----------------------------------------------------------------------------------


def test_flat_index_returns_exactly_the_brute_force_top_k():
    rng = np.random.default_rng(1)
    vectors, queries = unit_vectors(rng, 5000, 64), unit_vectors(rng, 50, 64)
    spec = choose_index(len(vectors), 64, GiB)
    assert spec.kind == "flat"
    index = build_index(vectors, spec, progress=False)
    scores, ids = index.search(queries, 10)
    true_scores, true_ids = brute_force(queries, vectors, 10)
    np.testing.assert_array_equal(ids, true_ids)
    np.testing.assert_allclose(scores, true_scores, atol=1e-5)


@pytest.mark.parametrize(
    ("bytes_per_vector", "flat_max_vectors", "kind"),
    [(150, 2_000_000, "ivfpq"), (600, 10_000, "hnsw")],  # 150 B < 4·64: no Flat; 600 B fits HNSW32 only
)
def test_auto_chosen_index_reaches_target_recall_on_held_out_queries(bytes_per_vector, flat_max_vectors, kind):
    rng = np.random.default_rng(2)
    n, d = 50_000, 64
    vectors = unit_vectors(rng, n, d)
    tuning_queries, held_out = unit_vectors(rng, 500, d), unit_vectors(rng, 1000, d)
    budget = n * bytes_per_vector
    spec = choose_index(n, d, budget, flat_max_vectors=flat_max_vectors)
    assert spec.kind == kind
    index = build_index(vectors, spec, progress=False)
    spec = tune(index, spec, vectors, tuning_queries, target_recall=0.95, k=10)
    assert spec.recall >= 0.95
    recall = mean_recall(index.search(held_out, 10)[1], brute_force(held_out, vectors, 10)[1])
    assert recall >= 0.95, (spec.factory, spec.params, recall)
    assert index_bytes(index) <= spec.estimated_bytes <= budget


@pytest.mark.parametrize("budget", [GiB, 40_000 * 80])  # Flat, then IVF-PQ with re-ranking
def test_save_load_round_trip_gives_identical_results(tmp_path, budget):
    rng = np.random.default_rng(3)
    vectors, queries = unit_vectors(rng, 40_000), unit_vectors(rng, 200)
    spec = choose_index(len(vectors), DIM, budget)
    index = build_index(vectors, spec, progress=False)
    spec = tune(index, spec, vectors, unit_vectors(rng, 200))
    expected = index.search(queries, 10)
    save_index(index, spec, tmp_path / "idx")
    for mmap in (True, False):
        loaded, loaded_spec = load_index(tmp_path / "idx", mmap=mmap)
        assert loaded_spec == spec
        if spec.kind == "ivfpq":
            assert faiss.extract_index_ivf(loaded).nprobe == spec.params["nprobe"]
        for got, want in zip(loaded.search(queries, 10), expected):
            np.testing.assert_array_equal(got, want)


def test_load_index_errors_name_the_file(tmp_path):
    vectors = unit_vectors(np.random.default_rng(4), 100)
    spec = choose_index(100, DIM, GiB)
    save_index(build_index(vectors, spec, progress=False), spec, tmp_path)
    (tmp_path / "index.faiss").write_bytes(b"not an index")
    with pytest.raises(InputError, match="index.faiss"):
        load_index(tmp_path)
    (tmp_path / "index.json").unlink()
    with pytest.raises(InputError, match="index.json"):
        load_index(tmp_path)


def test_search_index_over_a_store(tmp_path):
    rng = np.random.default_rng(5)
    expected = write_store(tmp_path, rng, [300, 500, 200])
    searcher = SearchIndex.build(tmp_path, progress=False)
    assert searcher.spec.kind == "flat"
    query = unit_vectors(rng, 1)[0]
    scores, rows = brute_force(query[None], expected["img"], 5)
    uids = [f"p{part}r{row}" for part, size in enumerate([300, 500, 200]) for row in range(size)]
    hits = searcher.results(query, k=5)
    assert [hit["id"] for hit in hits] == rows[0].tolist()
    assert [hit["uid"] for hit in hits] == [uids[r] for r in rows[0]]
    np.testing.assert_allclose([hit["score"] for hit in hits], scores[0], atol=1e-5)
    write_part(tmp_path, "img", 3, unit_vectors(rng, 10), metadata_table([str(i) for i in range(10)]))
    write_part(tmp_path, "text", 3, unit_vectors(rng, 10), None)
    with pytest.raises(InputError, match="rebuild"):
        SearchIndex(tmp_path)


def test_results_under_a_prefix_are_the_exact_top_k_of_those_rows(tmp_path):
    rng = np.random.default_rng(7)
    expected = write_store(tmp_path, rng, [300, 500, 200])
    searcher = SearchIndex.build(tmp_path, progress=False)
    uids = np.array([f"p{part}r{row}" for part, size in enumerate([300, 500, 200]) for row in range(size)])
    query = unit_vectors(rng, 1)[0]
    for prefix in ("p1r4", "p2", "p0r29"):  # rows spread over a part, a whole part, a few rows
        rows = np.flatnonzero(np.char.startswith(uids, prefix))
        scores, order = brute_force(query[None], expected["img"][rows], 7)
        hits = searcher.results_under(query, prefix, k=7)
        assert [hit["id"] for hit in hits] == rows[order[0]].tolist()
        assert all(hit["uid"].startswith(prefix) for hit in hits)
        np.testing.assert_allclose([hit["score"] for hit in hits], scores[0], atol=1e-5)
    assert searcher.results_under(query, "nowhere/", k=3) == []


def test_search_index_adds_the_held_out_tuning_rows(tmp_path):
    rng = np.random.default_rng(6)
    expected = write_store(tmp_path, rng, [12_000, 8_000])
    searcher = SearchIndex.build(tmp_path, kind="text", memory_budget=20_000 * 60, num_queries=500, progress=False)
    assert searcher.spec.kind == "ivfpq" and searcher.index.ntotal == 20_000
    tail = expected["text"][-500:]  # the held-out rows: each must now find itself first
    assert (searcher.search(tail, 1)[1][:, 0] == np.arange(19_500, 20_000)).mean() >= 0.99
    queries = unit_vectors(rng, 300)
    recall = mean_recall(searcher.search(queries, 10)[1], brute_force(queries, expected["text"], 10)[1])
    assert recall >= 0.95
