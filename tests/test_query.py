"""Weighted +/- queries of text and images, and the index/search verbs, checked against direct model calls
and a numpy brute-force ranking."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import run_cli
from PIL import Image
from test_embedder import write_shard
from test_serve import served_store, tiny_model_file

import clipforge
from clipforge.cli import embed as embed_cli
from clipforge.cli import retrieval as retrieval_cli
from clipforge.data.synthetic import SyntheticWorld
from clipforge.errors import ConfigError, InputError
from clipforge.retrieval import EmbeddingStore, SearchIndex
from clipforge.retrieval.embed import embed_to_store, model_reference
from clipforge.retrieval.query import QueryTerm, parse_query, query_vector


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, clipforge.CLIP]:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    torch.manual_seed(1)
    clipforge.save(clipforge.load("synthetic-tiny"), path)
    return path, clipforge.load(path)


@pytest.mark.parametrize(
    "query,expected",
    [
        ("golden retriever", [QueryTerm(1.0, text="golden retriever")]),
        ("2:golden retriever + ./pool.jpg - night", [QueryTerm(2.0, text="golden retriever"), QueryTerm(1.0, image=Path("pool.jpg")), QueryTerm(-1.0, text="night")]),
        ("t-shirt - 0.5:blue", [QueryTerm(1.0, text="t-shirt"), QueryTerm(-0.5, text="blue")]),
        ("- night", [QueryTerm(-1.0, text="night")]),
        ("/abs/x.png + ../up.jpg", [QueryTerm(1.0, image=Path("/abs/x.png")), QueryTerm(1.0, image=Path("../up.jpg"))]),
        ("1e-3:dog - -2:cat + .5:./x.png", [QueryTerm(0.001, text="dog"), QueryTerm(2.0, text="cat"), QueryTerm(0.5, image=Path("x.png"))]),
    ],
)
def test_parse_query(query, expected):
    assert parse_query(query) == expected


def test_parse_query_keeps_paths_as_text_when_images_are_not_allowed():
    assert parse_query("./secret.jpg + dog", allow_images=False) == [QueryTerm(1.0, text="./secret.jpg"), QueryTerm(1.0, text="dog")]


@pytest.mark.parametrize("query,needle", [("", "empty query"), ("dog +", "empty term"), ("a + + b", "empty term"), ("2:", "empty term")])
def test_parse_query_rejects_empty_terms(query, needle):
    with pytest.raises(InputError, match=needle):
        parse_query(query)


@pytest.mark.parametrize("query", ["nan:dog", "inf:dog", "1e400:dog", "dog - -Infinity:cat", "2:dog + NaN:./x.png"])
def test_parse_query_refuses_weights_that_are_not_finite(query):
    with pytest.raises(InputError, match="not a finite number"):
        parse_query(query)


def test_query_vector_is_the_normalised_weighted_sum(tmp_path, tiny):
    _, model = tiny
    picture = SyntheticWorld().sample("train", 3).image
    picture.save(tmp_path / "pool.png")
    vector = query_vector(model, parse_query(f"2:golden retriever + {tmp_path}/pool.png - 0.5:night"))
    with torch.no_grad():
        texts = model.encode_text(model.tokenize(["golden retriever", "night"]), normalize=True).numpy()
        image = model.encode_image(model.preprocess(Image.open(tmp_path / "pool.png"))[None], normalize=True).numpy()[0]
    expected = 2 * texts[0] + image - 0.5 * texts[1]
    np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), atol=1e-5)


def test_query_vector_errors(tmp_path, tiny):
    _, model = tiny
    with pytest.raises(InputError, match="cancel out"):
        query_vector(model, parse_query("dog - dog"))
    with pytest.raises(InputError, match="nope.jpg"):
        query_vector(model, parse_query(f"{tmp_path}/nope.jpg"))


def cli() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # a command group, as in ``clipforge.cli``
    embed_cli.register(app)
    retrieval_cli.register(app)
    return app


def brute_force_top(vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return np.argsort(-(vectors.astype(np.float64) @ query.astype(np.float64)), kind="stable")[:k].tolist()


def test_embed_index_search_end_to_end(tmp_path, tiny, capsys, monkeypatch):
    model_path, model = tiny
    world = SyntheticWorld()
    (tmp_path / "images").mkdir()
    for index in range(12):
        world.sample("train", index).image.save(tmp_path / "images" / f"img{index:02d}.png")
    app = cli()
    app(["embed", str(tmp_path / "images"), "--model", str(model_path), "--out", str(tmp_path / "store"), "--workers", "0"], standalone_mode=False)
    app(["index", str(tmp_path / "store"), "--memory-budget", "64MB"], standalone_mode=False)
    assert "Flat index over 12 vectors" in capsys.readouterr().out

    monkeypatch.chdir(tmp_path)
    app(["search", "2:a red circle", "+", "./images/img05.png", "-", "night", "--index", "store", "-k", "5", "--json"], standalone_mode=False)
    hits = json.loads(capsys.readouterr().out)
    stored = EmbeddingStore(tmp_path / "store").load_embeddings("img")
    with torch.no_grad():
        texts = model.encode_text(model.tokenize(["a red circle", "night"]), normalize=True).numpy()
        image = model.encode_image(model.preprocess(Image.open(tmp_path / "images" / "img05.png"))[None], normalize=True).numpy()[0]
    query = 2 * texts[0] + image - texts[1]
    query /= np.linalg.norm(query)
    assert [hit["id"] for hit in hits] == brute_force_top(stored, query, 5)
    np.testing.assert_allclose([hit["score"] for hit in hits], np.sort(stored @ query)[::-1][:5], atol=1e-5)
    assert [Path(hit["path"]).name for hit in hits] == [f"img{i:02d}.png" for i in brute_force_top(stored, query, 5)]

    app(["search", "./images/img07.png", "--index", "store", "-k", "3"], standalone_mode=False)
    table = capsys.readouterr().out
    first_row = table.split("1 │ 1.0000 │", 1)[1].split("\n 2 ")[0]  # the image itself, its path folded over lines
    assert "".join(first_row.replace("│", " ").split()).endswith("images/img07.png")


def test_index_rejects_a_bad_memory_budget_and_search_a_missing_store(tmp_path):
    app = cli()
    with pytest.raises(ConfigError, match="--memory-budget"):
        app(["index", str(tmp_path), "--memory-budget", "lots"], standalone_mode=False)
    with pytest.raises(InputError, match="no embedding store"):
        app(["search", "dog", "--index", str(tmp_path)], standalone_mode=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Path, Path]:
    """An indexed store and the model file it was made with (``test_serve.served_store``)."""
    return served_store(tmp_path_factory.mktemp("served"))


@pytest.mark.parametrize("query", ["nan:dog", "inf:dog", "1e400:dog"])
def test_search_refuses_a_weight_that_is_not_finite_in_one_line(served, capsys, query):
    store, _ = served
    code, out, err = run_cli(capsys, "search", query, "--index", store)
    assert code == 2 and not out
    assert err.count("\n") == 1 and query in err and "not a finite number" in err


def test_search_refuses_a_model_of_another_size_and_notes_another_model(served, tmp_path, capsys):
    store, model_path = served
    narrow = tiny_model_file(tmp_path / "narrow.safetensors", seed=5, embed_dim=64)
    code, out, err = run_cli(capsys, "search", "dog", "--index", store, "--model", narrow)
    assert code == 2 and not out and err.count("\n") == 1
    assert str(narrow) in err and str(model_path) in err and sorted(re.findall(r"(\d+)-dimensional", err)) == ["128", "64"]
    other = tiny_model_file(tmp_path / "other.safetensors", seed=4)
    code, out, err = run_cli(capsys, "search", "dog", "--index", store, "--model", other, "--json")
    assert code == 0 and len(json.loads(out)) == 10
    assert err.count("note:") == 1 and str(other) in err and str(model_path) in err


@pytest.mark.parametrize("verb", [["index"], ["search", "dog", "--index"]])
def test_exclude_dir_is_refused_on_an_embedding_store(served, capsys, verb):
    store, _ = served
    code, out, err = run_cli(capsys, *verb, store, "--exclude-dir", "trip")
    assert code == 2 and not out and err.count("\n") == 1 and "--exclude-dir" in err


def test_paths_only_names_shard_members_by_shard_and_key(tmp_path, tiny, capsys):
    model_path, model = tiny
    shard = tmp_path / "shards" / "00000.tar"
    write_shard(shard, first=0, count=4)  # samples s0000 … s0003
    embed_to_store(model, model_reference(str(model_path), None, None, "fp32"), [shard], tmp_path / "store", workers=0, progress=False)
    SearchIndex.build(tmp_path / "store", progress=False)
    code, out, _ = run_cli(capsys, "search", "a red circle", "--index", tmp_path / "store", "-f", "-k", "4")
    assert code == 0
    assert sorted(out.splitlines()) == [f"{shard.absolute()}:s{i:04d}" for i in range(4)]
