"""The synthetic world: purity, held-out and few-shot guarantees, captions, tasks, pixels, shards.

References are independent of the code under test: captions are parsed with the regular expressions
below, colors are recognised by nearest canonical RGB color, objects counted with scikit-image's
connected components, corruptions recomputed with numpy, shards read back with tarfile and pyarrow.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage.measure import label as connected_components

from clipforge.data.synthetic import (
    Shift,
    SyntheticDataset,
    SyntheticStream,
    SyntheticWorld,
    WorldConfig,
    write_shards,
)
from clipforge.errors import ConfigError, InputError

COLOR_WORDS = ["red", "green", "blue", "yellow", "purple", "cyan", "white", "black"]
BASE_SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross", "heart", "diamond"]
SHAPE_WORDS = [*BASE_SHAPES, "crescent", "arrow", "pentagon", "ring"]
PLURAL_TO_SHAPE = {("crosses" if s == "cross" else s + "s"): s for s in SHAPE_WORDS}
NOUN_PHRASE = re.compile(
    rf"\b(a|two|three) (?:(small|large) )?({'|'.join(COLOR_WORDS)}) ({'|'.join([*SHAPE_WORDS, *PLURAL_TO_SHAPE])})\b"
)
RELATION_WORDS = {"to the left of": "left of", "left of": "left of", "to the right of": "right of",
                  "right of": "right of", "above": "above", "below": "below", "under": "below"}
PLACE_WORDS = {"on the left": "left", "at the left": "left", "on the right": "right", "at the right": "right",
               "at the top": "top", "at the bottom": "bottom", "in the center": "center", "at the center": "center"}
# Textbook RGB of each color word, and a dark and a light gray standing for the muted backgrounds.
CANONICAL_RGB = [("red", (255, 0, 0)), ("green", (0, 128, 0)), ("blue", (0, 0, 255)), ("yellow", (255, 255, 0)),
                 ("purple", (128, 0, 128)), ("cyan", (0, 255, 255)), ("white", (255, 255, 255)),
                 ("black", (0, 0, 0)), ("background", (100, 100, 100)), ("background", (160, 160, 160))]


def parse_caption(caption: str) -> dict:
    """What a caption says, read with the regular expressions above (not with the generator's templates)."""
    phrases = NOUN_PHRASE.findall(caption)
    assert phrases, caption
    article, size, color, noun = phrases[0]
    count = {"a": 1, "two": 2, "three": 3}[article]
    assert (noun in PLURAL_TO_SHAPE) == (count > 1), caption
    parsed = {"shape": PLURAL_TO_SHAPE.get(noun, noun), "color": color, "size": size or None, "count": count,
              "second": None, "relation": None, "position": None}
    if len(phrases) > 1:
        between = caption.split(" ".join(filter(None, phrases[0])), 1)[1].split(" ".join(filter(None, phrases[1])))[0]
        parsed["relation"] = RELATION_WORDS[between.strip()]
        parsed["second"] = (PLURAL_TO_SHAPE.get(phrases[1][3], phrases[1][3]), phrases[1][2])
    for words, place in PLACE_WORDS.items():
        if caption.endswith(words):
            parsed["position"] = place
    return parsed


def color_labels(image: Image.Image) -> np.ndarray:
    """Per pixel, the name of the nearest canonical color (or "background" for the muted grays)."""
    names = [name for name, _ in CANONICAL_RGB]
    pixels = np.asarray(image, dtype=np.float32)
    distances = ((pixels[:, :, None, :] - np.array([rgb for _, rgb in CANONICAL_RGB], np.float32)) ** 2).sum(-1)
    return np.array(names)[distances.argmin(-1)]


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld()


def test_sample_is_a_pure_function_of_seed_split_and_index(world):
    forward = [world.sample("train", i) for i in range(12)]
    backward = [SyntheticWorld().sample("train", i) for i in reversed(range(12))][::-1]
    for a, b in zip(forward, backward, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert a.caption == b.caption and a.metadata == b.metadata
    assert len({np.asarray(s.image).tobytes() for s in forward}) == 12
    for other in (world.sample("val", 3), SyntheticWorld(WorldConfig(seed=1)).sample("train", 3)):
        assert not np.array_equal(np.asarray(other.image), np.asarray(forward[3].image))


def test_train_never_shows_held_out_combos_or_shapes_even_in_noisy_captions():
    config = WorldConfig(caption_noise_rate=0.3, duplicate_rate=0.2, second_object_rate=0.5)
    world = SyntheticWorld(config)
    held_out = {("circle", "green"), ("star", "blue"), ("heart", "yellow"), ("triangle", "white")}
    assert set(config.heldout_combos) == held_out
    for i in range(3000):
        text, meta = world.describe("train", i)
        said = parse_caption(text)
        shown = {(meta["shape"], meta["color"]), (meta["second_shape"], meta["second_color"])}
        named = {(said["shape"], said["color"]), said["second"]}
        assert not (shown | named) & held_out, (i, text)
        assert not {shape for shape, _ in shown | named - {None}} & {"crescent", "ring"}, (i, text)
    test_heldout = [world.describe("test_heldout", i)[1] for i in range(100)]
    assert {(m["shape"], m["color"]) for m in test_heldout} == held_out
    assert all(m["heldout_combo"] for m in test_heldout)
    assert {world.describe("test_ood", i)[1]["shape"] for i in range(100)} == {"crescent", "ring"}


def test_few_shot_shapes_appear_exactly_k_times_in_the_train_stream():
    world = SyntheticWorld(WorldConfig(few_shot_k=3, few_shot_window=500, duplicate_rate=0.3, caption_noise_rate=0.3))
    seen: dict[str, list[int]] = {"arrow": [], "pentagon": []}
    for i in range(1500):  # three windows: the shapes must never come back after the first
        text, meta = world.describe("train", i)
        shapes = {meta["shape"], meta["second_shape"], parse_caption(text)["shape"]}
        for shape in shapes & set(seen):
            seen[shape].append(i)
    assert {shape: len(indices) for shape, indices in seen.items()} == {"arrow": 3, "pentagon": 3}
    assert all(i < 500 for indices in seen.values() for i in indices)
    assert world.few_shot_indices() == seen


def test_captions_name_what_the_metadata_says(world):
    for split in ("train", "test", "test_fewshot"):
        for i in range(300):
            text, meta = world.describe(split, i)
            said = parse_caption(text)
            assert (said["shape"], said["color"], said["count"]) == (meta["shape"], meta["color"], meta["count"]), text
            assert said["size"] in (None, meta["size"]), text
            assert said["relation"] == meta["relation"], text
            if meta["relation"]:
                assert said["second"] == (meta["second_shape"], meta["second_color"]), text
            elif said["position"] is not None:
                assert said["position"] == meta["position"], text


def test_curation_knobs_hit_their_rates():
    world = SyntheticWorld(WorldConfig(caption_noise_rate=0.3, duplicate_rate=0.2, zipf_exponent=1.0))
    metas = [world.describe("train", i)[1] for i in range(4000)]
    fresh = [m for m in metas if m["duplicate_of"] is None]
    assert abs(sum(m["caption_noisy"] for m in fresh) / len(fresh) - 0.3) < 0.04
    assert abs((len(metas) - len(fresh)) / len(metas) - 0.2) < 0.03
    for i, meta in enumerate(metas[:400]):
        if meta["duplicate_of"] is not None:
            source = meta["duplicate_of"]
            assert source < i
            a, b = world.sample("train", i), world.sample("train", source)
            assert a.caption == b.caption and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    for meta in fresh:
        said = parse_caption(world.describe("train", meta["index"])[0])
        assert ((said["shape"], said["color"]) != (meta["shape"], meta["color"])) == meta["caption_noisy"]
    # Zipf with exponent 1 over shapes (in vocabulary order) and colors, held-out pairs removed.
    weights = np.outer(1 / np.arange(1, 9), 1 / np.arange(1, 9))
    for shape, color in [("circle", "green"), ("star", "blue"), ("heart", "yellow"), ("triangle", "white")]:
        weights[BASE_SHAPES.index(shape), COLOR_WORDS.index(color)] = 0
    expected = weights.sum(1) / weights.sum()
    observed = Counter(m["shape"] for m in fresh)
    frequencies = np.array([observed[s] for s in BASE_SHAPES]) / len(fresh)
    assert np.abs(frequencies - expected).max() < 0.03


def test_task_labels_follow_the_metadata_and_prompts_use_training_words(world):
    tasks = world.tasks()
    assert {name: len(t.classnames) for name, t in tasks.items()} == {
        "shape": 8, "shape_all": 12, "color": 8, "shape_color": 64, "count": 3, "position": 5}
    vocabulary = {word for i in range(3000) for word in world.describe("train", i)[0].replace(":", "").split()}
    for task in tasks.values():
        for classname in task.classnames:
            for template in task.templates:
                prompt_words = set(template.format(c=classname).rstrip(".").replace(":", "").split())
                assert prompt_words <= vocabulary | set(SHAPE_WORDS), (task.name, template, classname)
    for i in range(400):
        text, meta = world.describe("test", i)
        alone = meta["second_shape"] is None
        expected = {
            "shape": BASE_SHAPES.index(meta["shape"]) if meta["second_shape"] in (None, meta["shape"]) else None,
            "color": COLOR_WORDS.index(meta["color"]) if meta["second_color"] in (None, meta["color"]) else None,
            "shape_color": BASE_SHAPES.index(meta["shape"]) * 8 + COLOR_WORDS.index(meta["color"]) if alone else None,
            "count": meta["count"] - 1 if alone else None,
            "position": ["center", "left", "right", "top", "bottom"].index(meta["position"])
            if alone and meta["count"] == 1 else None,
        }
        for name, label in expected.items():
            assert tasks[name].label_of(meta) == label, (name, meta)
        if alone:
            assert tasks["shape_color"].classnames[expected["shape_color"]] in text
    assert tasks["shape"].label_of(world.describe("test_ood", 0)[1]) is None
    assert tasks["shape_all"].classnames[tasks["shape_all"].label_of(world.describe("test_ood", 0)[1])] in {
        "crescent", "ring"}


def test_pixels_show_the_described_objects(world):
    checked_counts = 0
    for i in range(150):
        sample = world.sample("val", i)
        meta, labels = sample.metadata, color_labels(sample.image)
        outside = np.ones(labels.shape, bool)
        for x0, y0, x1, y1 in meta["boxes"] + ([meta["second_box"]] if meta["second_box"] else []):
            outside[y0:y1, x0:x1] = False
        assert (labels[outside] == "background").all(), i  # muted backgrounds never pass for an object color
        for x0, y0, x1, y1 in meta["boxes"]:
            colored = Counter(labels[y0:y1, x0:x1][labels[y0:y1, x0:x1] != "background"].tolist())
            assert colored.most_common(1)[0][0] == meta["color"], (i, colored)
        if meta["second_color"] == meta["color"]:
            continue
        mask = labels == meta["color"]
        parts = connected_components(mask)
        sizes = np.bincount(parts.ravel())[1:]
        assert (sizes >= 4).sum() == meta["count"], i
        checked_counts += 1
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / 64, ys.mean() / 64
        where = meta["position"]
        if where is not None:
            assert {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6,
                    "center": 0.4 < cx < 0.6 and 0.4 < cy < 0.6}[where], (i, where, cx, cy)
        if meta["relation"]:
            ys2, xs2 = np.nonzero(labels == meta["second_color"])
            sx, sy = xs2.mean() / 64, ys2.mean() / 64
            assert {"left of": cx < sx, "right of": cx > sx, "above": cy < sy, "below": cy > sy}[meta["relation"]]
    assert checked_counts > 100


def test_shifts_change_pixels_but_not_the_scene(world):
    clean = world.sample("test", 5)
    clean_pixels = np.asarray(clean.image, dtype=np.float64)
    for name in ("stripes", "outline", "dots", "clutter_background", "gaussian_blur", "jpeg", "pixelate"):
        shifted = world.sample("test", 5, shift=name)
        assert shifted.caption == clean.caption and shifted.metadata["shape"] == clean.metadata["shape"]
        assert not np.array_equal(np.asarray(shifted.image), np.asarray(clean.image)), name
    for fill in ("stripes", "outline"):
        shifted = world.sample("test", 5, shift=fill)
        x0, y0, x1, y1 = clean.metadata["boxes"][0]
        inside = lambda s: (color_labels(s.image)[y0:y1, x0:x1] == clean.metadata["color"]).sum()  # noqa: E731
        assert 0 < inside(shifted) < inside(clean), fill
        assert shifted.metadata["fill"] == fill
    # ImageNet-C contrast, recomputed: (x - mean) * c + mean with c = 0.3 at severity 2.
    contrast = world.sample("test", 5, shift=Shift(corruption="contrast", severity=2))
    means = (clean_pixels / 255).mean(axis=(0, 1), keepdims=True)
    expected = np.round(np.clip((clean_pixels / 255 - means) * 0.3 + means, 0, 1) * 255)
    assert np.abs(np.asarray(contrast.image, dtype=np.float64) - expected).max() <= 1
    assert contrast.metadata["corruption"] == "contrast" and contrast.metadata["severity"] == 2
    configured = SyntheticWorld(WorldConfig(split_shifts={"test": "outline"}))
    assert configured.sample("test", 5).metadata["fill"] == "outline"
    assert configured.sample("val", 5).metadata["fill"] == "solid"


def test_retrieval_set_and_vocabulary(world):
    retrieval = world.retrieval_set("test", 6, captions_per_image=4)
    assert len(retrieval.images) == len(retrieval.captions) == 6
    for image, captions, meta in zip(retrieval.images, retrieval.captions, retrieval.metadata, strict=True):
        assert image.size == (64, 64) and image.mode == "RGB"
        assert captions[0] == world.sample("test", meta["index"]).caption
        assert len(set(captions)) == len(captions) == 4
        assert all((parse_caption(c)["shape"], parse_caption(c)["color"]) == (meta["shape"], meta["color"])
                   for c in captions)
    vocabulary = world.concept_vocabulary()
    assert vocabulary["colors"] == COLOR_WORDS and vocabulary["shapes"] == BASE_SHAPES
    assert vocabulary["train_shapes"] == BASE_SHAPES and vocabulary["few_shot_shapes"] == ["arrow", "pentagon"]
    assert "green circle" in vocabulary["heldout_combos"]


def read_tar(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def test_shards_read_back_and_resume_only_the_missing_one(world, tmp_path):
    result = write_shards(world, "val", 25, tmp_path, shard_size=10)
    assert result["num_shards"] == 3 and len(result["written"]) == 3
    members = read_tar(tmp_path / "00002.tar")
    # img2dataset keys: shard * 10**ceil(log10(shard_size)) + position, padded to 5 + 1 digits.
    assert sorted(members) == [f"0000{k}.{ext}" for k in (20, 21, 22, 23, 24) for ext in ("json", "png", "txt")]
    sample = world.sample("val", 23)
    stored = Image.open(io.BytesIO(members["000023.png"]))
    assert np.array_equal(np.asarray(stored), np.asarray(sample.image))
    assert members["000023.txt"].decode() == sample.caption
    assert json.loads(members["000023.json"])["shape"] == sample.metadata["shape"]
    table = pq.read_table(tmp_path / "index.parquet").to_pylist()
    assert [row["key"] for row in table][9:12] == ["000009", "000010", "000011"]
    assert table[23]["caption"] == sample.caption and table[23]["shard"] == 2
    assert table[23]["boxes"] == sample.metadata["boxes"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 10, "00001.tar": 10, "00002.tar": 5}

    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    before = read_tar(tmp_path / "00001.tar")
    (tmp_path / "00001.tar").unlink()
    rerun = write_shards(world, "val", 25, tmp_path, shard_size=10)
    assert rerun["written"] == [str(tmp_path / "00001.tar")] and len(rerun["skipped"]) == 2
    assert {n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in tmp_path.glob("*.tar")) if n != "00001.tar"} == {
        n: t for n, t in mtimes.items() if n != "00001.tar"}
    assert read_tar(tmp_path / "00001.tar") == before
    assert pq.read_table(tmp_path / "index.parquet").to_pylist() == table
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    with pytest.raises(ConfigError, match="world.json"):
        write_shards(SyntheticWorld(WorldConfig(seed=7)), "val", 25, tmp_path, shard_size=10)


def test_torch_datasets_shard_indices_without_overlap(world):
    readers = [SyntheticStream(world, "train", 3, 15, rank=r, world_size=2) for r in range(2)]
    captions = [[text for _, text in reader] for reader in readers]
    assert captions[0] == [world.sample("train", i).caption for i in range(3, 15, 2)]
    assert captions[1] == [world.sample("train", i).caption for i in range(4, 15, 2)]
    dataset = SyntheticDataset(world, "val", 4, text_transform=str.upper)
    assert len(dataset) == 4 and dataset[2][1] == world.sample("val", 2).caption.upper()
    with pytest.raises(IndexError):
        dataset[4]


def test_bad_input_names_the_field(world):
    with pytest.raises(ConfigError, match="split"):
        world.sample("training", 0)
    with pytest.raises(InputError, match="index"):
        world.sample("train", -1)
    with pytest.raises(ConfigError, match="heldout_shapes"):
        WorldConfig(heldout_shapes=("blob",))
    with pytest.raises(ConfigError, match="few_shot_shapes"):
        WorldConfig(heldout_shapes=("arrow",))
    with pytest.raises(ConfigError, match="heldout_combos"):
        WorldConfig(heldout_combos=(("circle", "mauve"),))
    with pytest.raises(ConfigError, match="fill"):
        Shift(fill="plaid")
    with pytest.raises(ConfigError, match="shift"):
        world.sample("test", 0, shift="fog")
    with pytest.raises(ConfigError, match="heldout_shapes"):
        SyntheticWorld(WorldConfig(heldout_shapes=())).sample("test_ood", 0)
