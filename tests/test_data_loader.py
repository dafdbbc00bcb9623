"""Train and eval loaders: rank sharding, exact resume, worker-independent augmentation, skipped samples.

References: batch indices are checked by hand-computed layouts and set algebra; resumed and
multi-worker runs are compared bitwise with an uninterrupted single-process run; augmentations with
``TrainTransform`` called directly on a generator seeded as the contract states.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from clipforge.data import loader as loader_module
from clipforge.data.loader import (
    ResumableBatchSampler,
    TrainSamples,
    build_eval_loader,
    build_train_loader,
)
from clipforge.data.sources import SampleError, WebDatasetSource
from clipforge.errors import ConfigError, InputError
from clipforge.preprocess.tokenizer import get_tokenizer
from clipforge.preprocess.transforms import (
    EvalTransform,
    PreprocessConfig,
    TrainTransform,
)

PREPROCESS = PreprocessConfig(size=16)
TRANSFORM = TrainTransform(
    PREPROCESS, scale=(0.3, 1.0), color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_prob=0.8, gray_scale_prob=0.2
)
TOKENIZER = get_tokenizer(16)


def image_of(index: int) -> Image.Image:
    rng = np.random.default_rng(index)
    width, height = 20 + index % 7, 18 + index % 5
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


class MemorySource:
    """Generated samples; the indices in ``bad`` fail as a source's bad samples do."""

    def __init__(self, length: int, bad: dict[int, str] | None = None) -> None:
        self.length, self.bad, self.dropped, self.loaded = length, bad or {}, [], []

    def __len__(self) -> int:
        return self.length

    def key(self, index: int) -> str:
        return f"mem/{index}"

    def load(self, index: int) -> tuple[Image.Image, str]:
        self.loaded.append(index)
        if index in self.bad:
            raise SampleError(self.key(index), self.bad[index])
        return image_of(index), f"caption number {index}"


def expected_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The contract: a generator seeded from numpy's SeedSequence([seed, epoch, index])."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def take(train_loader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = iter(train_loader)
    return [next(batches) for _ in range(count)]


def assert_same_batches(left, right) -> None:
    assert len(left) == len(right)
    for (pixels_a, tokens_a), (pixels_b, tokens_b) in zip(left, right):
        assert torch.equal(pixels_a, pixels_b) and torch.equal(tokens_a, tokens_b)


# -- sampler --


def batches_of(sampler: ResumableBatchSampler, count: int) -> list[list[tuple[int, int]]]:
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


def test_ranks_split_each_global_batch_exactly() -> None:
    single = batches_of(ResumableBatchSampler(23, 6, seed=4), 10)
    ranks = [batches_of(ResumableBatchSampler(23, 3, seed=4, rank=r, world_size=2), 10) for r in range(2)]
    for step in range(10):
        assert ranks[0][step] + ranks[1][step] == single[step]
    for epoch in range(3):  # 23 // 6 = 3 batches per epoch; 5 samples left out each epoch
        pairs = [pair for batch in single[3 * epoch : 3 * epoch + 3] for pair in batch]
        assert {e for e, _ in pairs} == {epoch}
        assert len({i for _, i in pairs}) == 18 and {i for _, i in pairs} <= set(range(23))
    assert [i for _, i in single[0]] != [i for _, i in single[3]]  # a new order every epoch
    assert batches_of(ResumableBatchSampler(23, 6, seed=4), 10) == single
    assert batches_of(ResumableBatchSampler(23, 6, seed=5), 10) != single


def test_unshuffled_sampler_layout_by_hand() -> None:
    rank1 = ResumableBatchSampler(10, 2, shuffle=False, rank=1, world_size=2)
    assert batches_of(rank1, 4) == [[(0, 2), (0, 3)], [(0, 6), (0, 7)], [(1, 2), (1, 3)], [(1, 6), (1, 7)]]


def test_sampler_state_dict_and_start_batch_continue_the_sequence() -> None:
    uninterrupted = batches_of(ResumableBatchSampler(23, 6, seed=1), 12)
    first = ResumableBatchSampler(23, 6, seed=1)
    batches_of(first, 7)
    state = first.state_dict()
    assert state == {"epoch": 2, "batch": 1, "samples": 23, "global_batch_size": 6, "seed": 1}
    resumed = ResumableBatchSampler(23, 6, seed=1)
    resumed.load_state_dict(state)
    assert batches_of(resumed, 5) == uninterrupted[7:]
    assert batches_of(ResumableBatchSampler(23, 6, seed=1, start_batch=7), 5) == uninterrupted[7:]
    # the same global batch over two ranks resumes from the same position
    halves = [ResumableBatchSampler(23, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    for half in halves:
        half.load_state_dict(state)
    assert [a + b for a, b in zip(batches_of(halves[0], 5), batches_of(halves[1], 5))] == uninterrupted[7:]


def test_sampler_rejects_positions_from_other_runs() -> None:
    sampler = ResumableBatchSampler(23, 6, seed=1)
    with pytest.raises(ConfigError, match="global_batch_size=4"):
        sampler.load_state_dict({"epoch": 0, "batch": 1, "samples": 23, "global_batch_size": 4, "seed": 1})
    with pytest.raises(ConfigError, match="samples=30"):
        sampler.load_state_dict({"epoch": 0, "batch": 1, "samples": 30, "global_batch_size": 6, "seed": 1})
    with pytest.raises(ConfigError, match="0 ≤ batch < 3"):
        sampler.load_state_dict({"epoch": 0, "batch": 3})
    with pytest.raises(ConfigError, match="fewer than one global batch of 8"):
        ResumableBatchSampler(7, 4, world_size=2, rank=1)
    with pytest.raises(ConfigError, match="rank 2 of world_size 2"):
        ResumableBatchSampler(70, 4, world_size=2, rank=2)


# -- samples: augmentation and replacement --


def test_augmentation_is_a_function_of_seed_epoch_and_index() -> None:
    samples = TrainSamples(MemorySource(12), TRANSFORM, TOKENIZER, seed=5)
    pixels, caption, skipped = samples[(1, 3)]
    assert skipped == [] and caption == "caption number 3"
    assert torch.equal(pixels, TRANSFORM(image_of(3), generator=expected_generator(5, 1, 3)))
    assert not torch.equal(pixels, samples[(2, 3)][0])
    copied = pickle.loads(pickle.dumps(samples))  # what a spawned worker receives
    assert torch.equal(copied[(1, 3)][0], pixels)


def test_bad_samples_are_replaced_by_the_next_good_one() -> None:
    bad = {3: "unreadable image", 4: "missing caption", 9: "empty caption"}
    samples = TrainSamples(MemorySource(10, bad), TRANSFORM, TOKENIZER, seed=0)

    pixels, caption, skipped = samples[(0, 3)]
    assert caption == "caption number 5"
    assert torch.equal(pixels, TRANSFORM(image_of(5), generator=expected_generator(0, 0, 3)))
    assert [(r.key, r.reason, r.message) for r in skipped] == [
        ("mem/3", "unreadable image", "mem/3: unreadable image"),
        ("mem/4", "missing caption", "mem/4: missing caption"),
    ]
    _, wrapped, skipped = samples[(0, 9)]
    assert wrapped == "caption number 0" and [r.key for r in skipped] == ["mem/9"]

    strict = TrainSamples(MemorySource(10, bad), TRANSFORM, TOKENIZER, seed=0, strict=True)
    pixels, caption, skipped = strict[(0, 3)]
    assert pixels is None and caption is None and [r.key for r in skipped] == ["mem/3"]


def test_collate_tokenizes_the_captions_in_batch_order() -> None:
    samples = TrainSamples(MemorySource(10, {3: "unreadable image"}), TRANSFORM, TOKENIZER, seed=0)
    pixels, tokens, skipped = samples.collate([samples[(0, i)] for i in (7, 3, 1)])
    assert torch.equal(tokens, TOKENIZER(["caption number 7", "caption number 4", "caption number 1"]))
    assert pixels.shape == (3, 3, 16, 16) and [r.key for r in skipped] == ["mem/3"]


def test_a_deterministic_transform_gives_the_plain_preprocessed_image() -> None:
    evaluation = EvalTransform(PREPROCESS)
    pixels, _, _ = TrainSamples(MemorySource(4), evaluation, TOKENIZER, seed=0)[(2, 1)]
    assert torch.equal(pixels, evaluation(image_of(1)))


# -- train loader --


BAD = {5: "unreadable image", 6: "unreadable image", 25: "missing caption"}


@pytest.fixture(scope="module")
def reference_run() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """14 batches of 4 from 26 samples (6 batches per epoch, so 2⅓ epochs), one process, no workers."""
    return take(build_train_loader(MemorySource(26, BAD), TRANSFORM, TOKENIZER, batch_size=4, workers=0, seed=9), 14)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_saved_position_yields_exactly_the_remaining_batches(reference_run, workers) -> None:
    def build(start=None):
        return build_train_loader(
            MemorySource(26, BAD), TRANSFORM, TOKENIZER, batch_size=4, workers=workers, seed=9, start=start
        )

    assert_same_batches(take(build(), 14), reference_run)  # the worker count changes nothing

    interrupted = build()
    take(interrupted, 9)
    position = interrupted.position
    assert position == {"epoch": 1, "batch": 3, "samples": 26, "global_batch_size": 4, "seed": 9}
    resumed = build(start=position)
    assert_same_batches(take(resumed, 5), reference_run[9:])
    assert resumed.position["epoch"] == 2 and resumed.position["batch"] == 2
    assert resumed.samples_per_epoch == 24


def test_resume_loads_no_sample_before_its_start() -> None:
    source = MemorySource(40)
    resumed = build_train_loader(
        source, TRANSFORM, TOKENIZER, batch_size=4, workers=0, seed=0, start={"epoch": 3, "batch": 8}
    )
    assert resumed.position["epoch"] == 3 and resumed.position["batch"] == 8
    take(resumed, 2)
    assert len(source.loaded) == 8
    assert resumed.position["epoch"] == 4 and resumed.position["batch"] == 0


def test_ranks_together_produce_the_single_process_batches() -> None:
    def run(batch_size: int, rank: int, world_size: int):
        return take(
            build_train_loader(MemorySource(26, BAD), TRANSFORM, TOKENIZER, batch_size=batch_size, workers=0,
                               seed=2, rank=rank, world_size=world_size),
            8,
        )

    single = run(4, 0, 1)
    rank0, rank1 = run(2, 0, 2), run(2, 1, 2)
    for step in range(8):
        assert torch.equal(torch.cat([rank0[step][0], rank1[step][0]]), single[step][0])
        assert torch.equal(torch.cat([rank0[step][1], rank1[step][1]]), single[step][1])


def test_spawned_workers_give_the_same_batches(reference_run, monkeypatch) -> None:
    monkeypatch.setattr(loader_module, "_multiprocessing_context", lambda workers: "spawn")
    spawned = build_train_loader(MemorySource(26, BAD), TRANSFORM, TOKENIZER, batch_size=4, workers=1, seed=9)
    assert_same_batches(take(spawned, 3), reference_run[:3])


# -- bad webdataset samples end to end --


def jpeg_bytes(index: int) -> bytes:
    buffer = io.BytesIO()
    image_of(index).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture()
def damaged_shards(tmp_path) -> tuple[str, dict[str, str]]:
    """Two shards of 8 samples with four bad ones, and an empty third shard."""
    problems = {
        "00000.tar:s0002": "unreadable image",
        "00000.tar:s0005": "missing caption",
        "00001.tar:s1001": "caption is not UTF-8",
        "00001.tar:s1006": "empty caption",
    }
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"{shard:05d}.tar"), encoder=False) as writer:
            for index in range(8):
                key = f"s{shard}{index:03d}"
                reason = problems.get(f"{shard:05d}.tar:{key}")
                sample = {"__key__": key, "jpg": jpeg_bytes(10 * shard + index), "txt": f"sample {key}".encode()}
                if reason == "unreadable image":
                    sample["jpg"] = sample["jpg"][:200]
                elif reason == "missing caption":
                    del sample["txt"]
                elif reason == "caption is not UTF-8":
                    sample["txt"] = "naïve".encode("latin-1")
                elif reason == "empty caption":
                    sample["txt"] = b"   "
                writer.write(sample)
    with wds.TarWriter(str(tmp_path / "00002.tar")):
        pass
    return str(tmp_path / "{00000..00002}.tar"), {f"{tmp_path}/{key}": reason for key, reason in problems.items()}


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_keeps_full_batches_and_reports_every_reason(damaged_shards, workers) -> None:
    pattern, problems = damaged_shards
    train_loader = build_train_loader(WebDatasetSource(pattern), TRANSFORM, TOKENIZER, batch_size=5, workers=workers, seed=0)
    for pixels, tokens in take(train_loader, 9):  # 3 batches per epoch: every sample is met
        assert pixels.shape == (5, 3, 16, 16) and tokens.shape == (5, 16)

    expected_reasons = {reason: 1 for reason in problems.values()} | {"empty shard": 1}
    assert train_loader.skips.counts == expected_reasons
    for key, reason in problems.items():
        assert train_loader.skips.keys(reason) == [key]
    empty_shard = pattern.replace("{00000..00002}", "00002")
    assert train_loader.skips.keys("empty shard") == [empty_shard]
    lines = train_loader.skips.summary().splitlines()
    assert sorted(lines) == sorted(f"{reason}: 1 ({key})" for key, reason in [*problems.items(), (empty_shard, "empty shard")])


@pytest.mark.parametrize("workers", [0, 2])
def test_strict_loader_fails_on_the_first_bad_sample_naming_it(damaged_shards, workers) -> None:
    pattern, problems = damaged_shards
    source = WebDatasetSource(pattern)
    strict = build_train_loader(source, TRANSFORM, TOKENIZER, batch_size=4, workers=workers, seed=0, strict=True)
    with pytest.raises(InputError) as caught:
        take(strict, 8)
    message = str(caught.value)
    assert "\n" not in message
    assert any(message.startswith(f"{key}: {reason}") for key, reason in problems.items())


def test_a_source_without_any_readable_sample_fails_clearly() -> None:
    hopeless = build_train_loader(
        MemorySource(4, dict.fromkeys(range(4), "unreadable image")), TRANSFORM, TOKENIZER, batch_size=2, workers=0, seed=0
    )
    with pytest.raises(InputError, match="no readable sample in the data source; the first error was: mem/"):
        take(hopeless, 1)


# -- eval loader --


def test_eval_loader_goes_once_in_order_without_the_bad_samples(damaged_shards) -> None:
    pattern, problems = damaged_shards
    source = WebDatasetSource(pattern)
    evaluation = build_eval_loader(source, EvalTransform(PREPROCESS), TOKENIZER, batch_size=5, workers=2)
    batches = list(evaluation)

    good = [i for i in range(len(source)) if source.key(i) not in problems]
    assert [key for _, _, keys in batches for key in keys] == [source.key(i) for i in good]
    assert [len(keys) for _, _, keys in batches] == [4, 3, 4, 1]  # 5 per batch minus the bad ones (2; 5, 9; 14)
    pixels = torch.cat([p for p, _, _ in batches])
    tokens = torch.cat([t for _, t, _ in batches])
    reference = EvalTransform(PREPROCESS)
    for row, index in enumerate(good):
        image = Image.open(io.BytesIO(jpeg_bytes(10 * (index // 8) + index % 8)))
        assert torch.equal(pixels[row], reference(image))
        assert torch.equal(tokens[row], TOKENIZER([f"sample {source.key(index).rsplit(':', 1)[1]}"])[0])
    assert evaluation.skips.counts == {reason: 1 for reason in problems.values()} | {"empty shard": 1}

    strict = build_eval_loader(source, EvalTransform(PREPROCESS), TOKENIZER, 5, 0, strict=True)
    with pytest.raises(InputError, match="s0002: unreadable image"):
        list(strict)
