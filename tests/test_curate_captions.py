"""Multi-caption samples: rewriters (rules keep the scene's concepts; a Python callable; a shell command), shards
with captions.json, and the trainer's loader drawing one caption per visit, uniformly, seeded and resumable."""

from __future__ import annotations

import re
import sys
from collections import Counter

import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_cli
from curate_helpers import WORLD

from clipforge.data.curate.engine import Engine
from clipforge.data.curate.job import curate_rewrite
from clipforge.data.curate.rewrite import CommandRewriter, RuleRewriter, parse_rewriter
from clipforge.data.loader import build_train_loader, seeded_generator
from clipforge.data.sources import MultiCaptionSource, open_source
from clipforge.data.synthetic import SyntheticWorld, WorldConfig, write_shards
from clipforge.data.synthetic.concepts import RELATION_PHRASES, RELATIONS
from clipforge.errors import ConfigError, InputError


def upper(captions):
    return [[caption.upper(), caption + " indeed"] for caption in captions]


def no_purple(captions):
    """A user's rewriter that fails on some captions only."""
    if any("purple" in caption.split() for caption in captions):
        raise ValueError("purple is not allowed")
    return [[caption] for caption in captions]


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    world = SyntheticWorld(WORLD)
    write_shards(world, "train", 24, root / "pool", shard_size=12)
    curate_rewrite([root / "pool"], root / "multi", RuleRewriter(3), engine=Engine(workers=1))
    return root, world


def test_rule_rewrites_keep_color_and_shape(multi):
    root, world = multi
    for index in range(24):
        caption, metadata = world.describe("train", index)
        if metadata["caption_noisy"]:
            continue
        for text in RuleRewriter(4)([caption])[0]:
            words = text.replace(",", "").split()
            assert metadata["color"] in words and any(word.startswith(metadata["shape"]) for word in words), (caption, text)


def test_rule_rewrites_of_relations_say_the_scene_in_whole_phrases():
    """Said from either object, a rewritten relation caption names both objects with their sizes and the
    relation that holds from the object said first (the scene's metadata is the reference)."""
    world = SyntheticWorld(WorldConfig())
    sizes = {"small": "small", "little": "small", "large": "large", "big": "large"}
    seen_from = {relation: {other for other, sides in RELATIONS.items() if sides == own[::-1]} for relation, own in RELATIONS.items()}
    frame = re.compile(r"^(?:a photo of |a picture of |an image of |there is |a rendering of )?(.*?)(?:, a photo)?$")
    size_word = "(?:(" + "|".join(sizes) + ") )?"
    said = re.compile(rf"^a {size_word}(\w+) (\w+) (.+) a {size_word}(\w+) (\w+)$")
    checked = 0
    for index in range(300):
        caption, scene = world.describe("train", index)
        if scene["relation"] is None or scene["caption_noisy"]:
            continue
        first = (scene["size"], scene["color"], scene["shape"])
        second = (scene["second_size"], scene["second_color"], scene["second_shape"])
        for text in RuleRewriter(4)([caption])[0]:
            parts = said.match(frame.match(text).group(1))
            assert parts, (caption, text)
            size_a, color_a, shape_a, phrase, size_b, color_b, shape_b = parts.groups()
            objects = [(sizes.get(size_a), color_a, shape_a), (sizes.get(size_b), color_b, shape_b)]
            if objects[0][1:] == first[1:]:
                relations, expected = {scene["relation"]}, [first, second]
            else:
                relations, expected = seen_from[scene["relation"]], [second, first]
            assert all(size in (None, want[0]) and (color, shape) == want[1:] for (size, color, shape), want in zip(objects, expected)), (caption, text)
            assert any(phrase in RELATION_PHRASES[relation] for relation in relations), (caption, text)
            checked += 1
    assert checked > 50


def test_python_and_command_rewriters(tmp_path):
    assert parse_rewriter("python:test_curate_captions:upper")(["a red star"]) == [["A RED STAR", "a red star indeed"]]
    script = "import sys, json\nfor line in sys.stdin: print(json.dumps([line.strip()[::-1]]))"
    command = CommandRewriter(f"{sys.executable} -c '{script}'")
    assert command(["abc", "de f"]) == [["cba"], ["f ed"]]
    with pytest.raises(InputError, match="exit status"):
        CommandRewriter("exit 3")(["x"])
    with pytest.raises(ConfigError):
        parse_rewriter("llm")


def test_a_failing_rewriter_is_one_line_naming_it_the_sample_and_the_error(multi, tmp_path, capsys):
    root, _ = multi
    pool = root / "pool"
    index = pq.read_table(pool / "index.parquet").to_pylist()  # what data synth wrote, in pool order
    purple = next(row for row in index if "purple" in row["caption"].split())
    assert purple["shard"] > 0  # the failing sample is not the first one
    code, _, err = run_cli(capsys, "curate", "rewrite", pool, "--out", tmp_path / "p", "--workers", "1",
                           "--rewriter", "python:test_curate_captions:no_purple")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    shard = pool / f"{purple['shard']:05d}.tar"
    assert f"{shard}:{purple['key']}" in err
    assert "python:test_curate_captions:no_purple" in err and "ValueError: purple is not allowed" in err
    code, _, err = run_cli(capsys, "curate", "rewrite", pool, "--out", tmp_path / "c", "--workers", "1", "--rewriter", "command:false")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{pool / '00000.tar'}:{index[0]['key']}" in err and "command:false" in err and "exit status 1 (nothing on stderr)" in err


def test_shards_carry_every_caption_and_open_as_multi_caption(multi):
    root, world = multi
    source = open_source(str(root / "multi"))
    assert isinstance(source, MultiCaptionSource) and len(source) == 24
    _, caption = source.load(5)
    assert caption == world.describe("train", 5)[0]
    options = source.captions(5, caption)
    assert options == [caption, *RuleRewriter(3)([caption])[0]]


def test_one_caption_per_visit_uniform_and_seeded(multi):
    root, _ = multi
    source = open_source(str(root / "multi"))
    options = source.captions(3, source.load(3)[1])
    draws = Counter()
    for epoch in range(600):
        _, text = source.load_train(3, lambda image, generator=None: torch.zeros(1), seeded_generator(0, epoch, 3))
        draws[text] += 1
    expected = Counter(options)  # uniform over the list (LaCLIP draws among original + rewrites)
    assert set(draws) == set(expected) and len(options) > 2
    assert all(abs(draws[text] / 600 - expected[text] / len(options)) < 0.07 for text in expected)
    first = source.load_train(3, lambda image, generator=None: torch.zeros(1), seeded_generator(1, 0, 3))[1]
    assert first == source.load_train(3, lambda image, generator=None: torch.zeros(1), seeded_generator(1, 0, 3))[1]


def test_loader_resumes_with_the_same_captions(multi):
    root, _ = multi
    source = open_source(str(root / "multi"))
    texts: list[list[str]] = []

    def tokenizer(captions):
        texts.append(list(captions))
        return torch.zeros(len(captions), 4, dtype=torch.long)

    def transform(image, generator=None):
        return torch.zeros(3, 8, 8)

    loader = build_train_loader(source, transform, tokenizer, batch_size=4, workers=0, seed=2)
    batches = iter(loader)
    for _ in range(9):
        next(batches)
    position = build_train_loader(source, transform, tokenizer, batch_size=4, workers=0, seed=2).sampler.position_at(5)
    uninterrupted = texts[5:9]
    texts.clear()
    resumed = iter(build_train_loader(source, transform, tokenizer, batch_size=4, workers=0, seed=2, start=position))
    for _ in range(4):
        next(resumed)
    assert texts == uninterrupted
    assert len({text for batch in uninterrupted for text in batch}) > 4  # rewrites are drawn, not only originals
