"""The curation steps end to end on a small noisy pool: exact and planted near-duplicates found, balancing
probabilities equal MetaCLIP's formula, corrupt samples counted and never kept, resharded bytes equal the
originals, the report written; the CLI's CLIP-score filter against scores computed here."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from curate_helpers import WORLD, add_member, build_pool
from typer.testing import CliRunner

import clipforge
from clipforge.cli import app
from clipforge.data.curate.descriptors import pixel_descriptor, pixel_embeddings
from clipforge.data.curate.engine import Engine
from clipforge.data.curate.job import (
    curate_balance,
    curate_dedup,
    curate_filter,
    curate_reshard,
)
from clipforge.data.curate.steps import FilterSettings
from clipforge.data.curate.subset import load_subset, pair_uids, save_subset
from clipforge.data.formats.shards import shard_index
from clipforge.data.synthetic import SyntheticWorld
from clipforge.encode import embed_images, encode_texts

LOCAL = Engine(workers=1)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    return root, build_pool(root / "pool")


def decisions(out):
    return pq.read_table(out / "decisions.parquet").to_pylist()


def world_index(key: str) -> int:
    return int(key) // 100 * 20 + int(key) % 100 if key.isdigit() else -1  # keys: shard * 100 + position, 20 per shard


def test_dedup_finds_every_exact_and_planted_near_duplicate(pool, tmp_path):
    root, planted = pool
    # 0.97 lies between the fixture's most similar distinct images (0.952) and its least similar copy (0.985)
    summary = curate_dedup([root / "pool"], tmp_path / "d", threshold=0.97, embed=pixel_embeddings, engine=LOCAL)
    rows = decisions(tmp_path / "d")
    by_key = {row["key"]: row for row in rows}
    key_of = {world_index(row["key"]): row["key"] for row in rows if world_index(row["key"]) >= 0}
    # Every world duplicate (duplicate_of set) is in the exact group of its source and dropped.
    for index in planted["exact"]:
        source = planted["duplicate_of"][index]
        assert by_key[key_of[index]]["exact_group"] == by_key[key_of[source]]["exact_group"]
        assert not by_key[key_of[index]]["kept"]
    # Every planted JPEG copy joins its source's near-duplicate group and is dropped.
    for number, source in enumerate(planted["near_sources"]):
        copy = by_key[f"near{number:03d}"]
        assert copy["near_group"] == by_key[key_of[source]]["near_group"] and not copy["kept"]
        assert copy["exact_group"] != by_key[key_of[source]]["exact_group"]  # re-encoded: not byte-equal
    # Nothing else is dropped: kept = readable originals that are not world duplicates.
    expected = {key_of[i] for i in range(planted["n"]) if planted["duplicate_of"][i] is None}
    assert {row["key"] for row in rows if row["kept"]} == expected
    assert summary["unreadable"] == 2 and summary["kept"] == len(expected)
    assert set(summary["unreadable_reasons"]) == {"not a readable image", "missing caption"}


def test_balance_probabilities_equal_the_formula(pool, tmp_path):
    root, _ = pool
    entries = ["red", "blue", "green", "star", "circle", "square", "a photo of"]
    summary = curate_balance([root / "pool"], tmp_path / "b", entries, t=4, seed=3, engine=LOCAL)
    rows = decisions(tmp_path / "b")
    readable = [row for row in rows if row["error"] is None]
    padded = {id(row): " " + row["caption"].replace(".", " . ").replace(",", " , ").replace(":", " : ") + " " for row in readable}
    matched = {id(row): [e for e in entries if f" {e} " in padded[id(row)]] for row in readable}
    counts = {e: sum(e in m for m in matched.values()) for e in entries}
    assert summary["entry_counts"] == counts
    for row in readable:
        expected = 1 - np.prod([1 - 4 / max(counts[e], 4) for e in matched[id(row)]]) if matched[id(row)] else 0.0
        assert row["keep_probability"] == pytest.approx(expected)
        assert sorted(row["matched"]) == sorted(matched[id(row)])
    assert not any(row["kept"] for row in rows if row["error"] is not None or not row["matched"])
    again = curate_balance([root / "pool"], tmp_path / "b2", entries, t=4, seed=3, engine=LOCAL)
    assert again["kept"] == summary["kept"]
    assert np.array_equal(load_subset(tmp_path / "b" / "subset.npy"), load_subset(tmp_path / "b2" / "subset.npy"))


def test_filter_chain_and_reshard_copy_the_bytes(pool, tmp_path):
    root, _ = pool
    curate_filter([root / "pool"], tmp_path / "f", FilterSettings(basic=True, min_side=32, text_concepts=("red", "blue")), engine=LOCAL)
    rows = decisions(tmp_path / "f")
    for row in rows:
        words = (row["caption"] or "").split()
        by_hand = row["error"] is None and len(words) >= 3 and ("red" in words or "blue" in words)
        assert row["kept"] == by_hand, row
    subset = tmp_path / "f" / "subset.npy"
    sizes = curate_reshard([root / "pool"], subset, tmp_path / "r", shard_size=7, engine=LOCAL)
    kept = [row for row in rows if row["kept"]]
    assert sum(sizes.values()) == len(kept) and max(sizes.values()) == 7
    assert json.loads((tmp_path / "r" / "sizes.json").read_text()) == sizes
    written = []
    for name in sorted(sizes):
        with tarfile.open(tmp_path / "r" / name) as archive:
            written += [(member.name, archive.extractfile(member).read()) for member in archive.getmembers()]
    originals = []
    for row in kept:
        index = shard_index(sorted((root / "pool").glob("*.tar"))[row["shard"]])
        position = index.keys.index(row["key"])
        for entry in range(int(index.starts[position]), int(index.starts[position + 1])):
            field = index.field_names[int(index.field_codes[entry])]
            with open(index.path, "rb") as stream:
                stream.seek(int(index.offsets[entry]))
                originals.append((f"{row['key']}.{field}", stream.read(int(index.sizes[entry]))))
    assert written == originals
    # Chained step: dedup restricted to the filter's subset keeps a subset of it.
    curate_dedup([root / "pool"], tmp_path / "fd", engine=LOCAL, subset=subset)
    assert set(pair_uids(load_subset(tmp_path / "fd" / "subset.npy"))) <= set(pair_uids(load_subset(subset)))


def test_cli_clip_score_filter_and_report(pool, tmp_path, tiny):
    root, _ = pool
    model = tmp_path / "tiny.safetensors"
    clipforge.save(tiny, model)
    out = tmp_path / "clip"
    result = CliRunner().invoke(app, ["curate", "filter", str(root / "pool"), "--out", str(out), "--model", str(model),
                                      "--clip-fraction", "0.5", "--workers", "1"])
    assert result.exit_code == 0, result.output
    rows = decisions(out)
    readable = [row for row in rows if row["error"] is None]
    paths = sorted((root / "pool").glob("*.tar"))
    members = [shard_index(paths[row["shard"]]) for row in readable]
    images = [index.image(index.keys.index(row["key"])) for index, row in zip(members, readable)]
    scores = (embed_images(tiny, images, progress=False).embeddings * encode_texts(tiny, [row["caption"] for row in readable]).numpy()).sum(1)
    assert np.allclose([row["score"] for row in readable], scores, atol=2e-3)  # the store keeps float16 images
    threshold = np.sort(scores)[::-1][int(len(scores) * 0.5)]
    expected = {row["uid"] for row, score in zip(readable, scores) if score >= threshold + 2e-3}
    kept = {row["uid"] for row in rows if row["kept"]}
    assert expected <= kept and len(kept) <= len({row["uid"] for row, s in zip(readable, scores) if s >= threshold - 2e-3})
    report = CliRunner().invoke(app, ["curate", "report", str(out), "--out", str(tmp_path / "report"), "--concepts", "red,blue,star"])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| not a readable image | 1 |" in text and "| missing caption | 1 |" in text
    assert (tmp_path / "report" / "grid.png").stat().st_size > 1000 and "<table>" in (tmp_path / "report" / "report.html").read_text()


def test_cli_refuses_bad_input_in_one_line(pool, tmp_path):
    root, _ = pool
    result = CliRunner().invoke(app, ["curate", "filter", str(root / "pool"), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "choose at least one filter" in str(result.exception or result.output)
    result = CliRunner().invoke(app, ["curate", "reshard", str(root / "pool"), "--subset", str(tmp_path / "none.npy"), "--out", str(tmp_path / "y")])
    assert "no such subset file" in str(result.exception or result.output)
    result = CliRunner().invoke(app, ["curate", "dedup", str(root / "pool"), "--out", str(tmp_path / "z"), "--descriptor", "model"])
    assert "give --model" in str(result.exception or result.output)


def test_cli_dedup_with_pixel_descriptors(pool, tmp_path):
    root, planted = pool
    result = CliRunner().invoke(app, ["curate", "dedup", str(root / "pool"), "--out", str(tmp_path / "d"), "--threshold", "0.97", "--workers", "1"])
    assert result.exit_code == 0, result.output
    kept = {row["key"] for row in decisions(tmp_path / "d") if row["kept"]}
    assert not any(key.startswith("near") for key in kept) and len(kept) == planted["n"] - len(planted["exact"])


def test_cli_dedup_summary_and_report_count_what_each_criterion_drops(pool, tmp_path, capsys):
    root, planted = pool
    copied = {planted["duplicate_of"][i] for i in planted["exact"]} | set(planted["near_sources"])
    alone = next(i for i in range(planted["n"]) if planted["duplicate_of"][i] is None and i not in copied)
    evaluation = tmp_path / "evaluation"  # one evaluation image: a pool image that has no copy in the pool
    evaluation.mkdir()
    buffer = io.BytesIO()
    SyntheticWorld(WORLD).sample("train", alone).image.save(buffer, format="PNG")
    with tarfile.open(evaluation / "00000.tar", "w") as archive:
        add_member(archive, "copy.png", buffer.getvalue())
        add_member(archive, "copy.txt", b"a copy")
    code, _, err = run_cli(capsys, "curate", "dedup", root / "pool", "--out", tmp_path / "d", "--threshold", "0.97", "--against", evaluation,
                           "--against-threshold", "0.97", "--workers", "1")
    assert code == 0, err
    readable = planted["n"] + len(planted["near_sources"])  # the corrupt and the caption-less samples are not input
    dropped = {"exact_duplicate": len(planted["exact"]), "near_duplicate": len(planted["exact"]) + len(planted["near_sources"]),
               "near_evaluation": 1}  # a byte-identical copy is a near-duplicate too
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["dropped"] == dropped and summary["passed"] == {name: readable - count for name, count in dropped.items()}
    assert summary["input"] == readable and summary["kept"] == readable - dropped["near_duplicate"] - 1
    code, _, err = run_cli(capsys, "curate", "report", tmp_path / "d", "--out", tmp_path / "report")
    assert code == 0, err
    table = (tmp_path / "report" / "report.md").read_text()
    for name, count in dropped.items():
        assert f"| {name} | {readable - count} | {count} |" in table
    # The default histogram keeps short content words ("red") and leaves out function words ("a", "of").
    rows = [row for row in decisions(tmp_path / "d") if row["input"]]
    said = [set(re.findall(r"\w+", row["caption"])) for row in rows]
    red = sum("red" in words for words in said), sum("red" in words for words, row in zip(said, rows) if row["kept"])
    assert f"| red | {red[0]} | {red[1]} |" in table
    assert not any(f"| {word} |" in table for word in ("a", "of", "the", "on"))


def test_cli_refuses_a_missing_list_file_and_reads_files_and_a_b_c(pool, tmp_path, capsys):
    root, _ = pool
    for step, option, value in (("balance", "--metadata", "nosuch.txt"), ("filter", "--text-concepts", "concepts.csv"),
                                ("filter", "--text-concepts", "lists/concepts")):
        code, _, err = run_cli(capsys, "curate", step, root / "pool", "--out", tmp_path / "x", option, value)
        assert code == 2 and f"{option} {value}: no such file" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()
    (tmp_path / "concepts.txt").write_text("red\nblue\n")
    kept = []
    for number, value in enumerate(("red,blue", tmp_path / "concepts.txt")):
        code, _, err = run_cli(capsys, "curate", "filter", root / "pool", "--out", tmp_path / f"f{number}", "--text-concepts", value, "--workers", "1")
        assert code == 0, err
        kept.append({row["key"] for row in decisions(tmp_path / f"f{number}") if row["kept"]})
    by_hand = {row["key"] for row in decisions(tmp_path / "f0") if row["error"] is None and {"red", "blue"} & set(re.findall(r"\w+", row["caption"]))}
    assert kept[0] == kept[1] == by_hand and by_hand


def test_cli_refuses_a_subset_of_another_pool_and_a_model_it_would_ignore(pool, tmp_path, capsys):
    root, _ = pool
    other = tmp_path / "other.npy"
    save_subset(other, ["0123456789abcdef0123456789abcdef", "f" * 32])  # uids of no sample of the pool
    for step in (["reshard", "--subset", other], ["dedup", "--subset", other]):
        code, _, err = run_cli(capsys, "curate", step[0], root / "pool", "--out", tmp_path / "out", *step[1:])
        assert code == 2 and f"{other}: none of its 2 uids" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, "curate", "dedup", root / "pool", "--out", tmp_path / "out", "--threshold", "0.97",
                           "--model", tmp_path / "model.safetensors")
    assert code == 2 and "--descriptor model" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_pixel_descriptor_is_the_thumbnail_correlation():
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    image = image.resize((32, 32))  # a multiple of 8, so the box filter is a 4x4 mean
    pixels = np.asarray(image, dtype=np.float64)
    thumb = pixels.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)).ravel()  # box filter by hand, channels last
    thumb -= thumb.mean()
    assert np.allclose(pixel_descriptor(image), thumb / np.linalg.norm(thumb), atol=1e-2)
    assert np.allclose(np.linalg.norm(pixel_descriptor(Image.new("RGB", (8, 8), "red"))), 1.0)
