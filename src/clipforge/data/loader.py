"""Training and evaluation loaders over caption sources: deterministic, resumable and sharded by rank.

Everything a batch holds is a pure function of (seed, epoch, position in the epoch), never of the
number of workers, the order they finish in, or where a run was interrupted:

- ``ResumableBatchSampler``: epoch e visits ``torch.randperm(len)`` drawn from a generator seeded by
  (seed, e), cut into global batches of ``batch_size * world_size`` (the remainder is dropped); rank r
  takes slice ``[r*B, (r+1)*B)`` of each, so the ranks' batches of a step together are exactly the
  one-process batch of that step. Its position is one integer, the global batch number.
- ``TrainSamples``: the augmentation of sample i in epoch e draws from a generator seeded by
  (seed, e, i). A bad sample is replaced by the next good one (i+1, i+2, … wrapping around), so
  batches keep their size, as DDP's all-gather requires; the skip travels with the batch.
- ``TrainLoader``: iterates forever; ``position`` counts the batches handed out (not those prefetched
  by workers), so resuming from a saved position yields exactly the batches an uninterrupted run would.

Unlike open_clip's webdataset pipeline (shard shuffling plus an in-memory shuffle buffer, sequential
reads; mlfoundations/open_clip ``open_clip_train/data.py``), every source here is map-style with random access, which is
what makes the shuffle global and the resume exact.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clipforge.data.formats.samples import SampleError
from clipforge.data.sources import CaptionSource
from clipforge.errors import ConfigError, InputError
from clipforge.preprocess.transforms import EvalTransform

Tokenizer = Callable[[list[str]], torch.Tensor]


class SkipRecord(NamedTuple):
    """A sample (or input) left out: its key, the reason to count it by, and the one-line error."""

    key: str
    reason: str
    message: str


def _skip_record(source: CaptionSource, index: int, error: InputError) -> SkipRecord:
    reason = error.reason if isinstance(error, SampleError) else "bad sample"
    return SkipRecord(source.key(index), reason, str(error))


class SkipReport:
    """Distinct skipped keys counted by reason, with the first ``keys_shown`` keys of each reason."""

    def __init__(self, keys_shown: int = 3) -> None:
        self.keys_shown = keys_shown
        self._keys: dict[str, set[str]] = {}
        self._first: dict[str, list[str]] = {}

    def add(self, record: SkipRecord) -> None:
        keys = self._keys.setdefault(record.reason, set())
        if record.key not in keys:
            keys.add(record.key)
            first = self._first.setdefault(record.reason, [])
            if len(first) < self.keys_shown:
                first.append(record.key)

    def extend(self, records: Iterable[SkipRecord]) -> None:
        for record in records:
            self.add(record)

    @property
    def counts(self) -> dict[str, int]:
        return {reason: len(keys) for reason, keys in self._keys.items()}

    def keys(self, reason: str) -> list[str]:
        """The first few keys skipped for ``reason``, in the order they were met."""
        return list(self._first.get(reason, []))

    def summary(self) -> str:
        """One line per reason, ``"<reason>: <count> (<first keys>, …)"``; empty when nothing was skipped."""
        lines = []
        for reason, count in self.counts.items():
            more = ", …" if count > len(self._first[reason]) else ""
            lines.append(f"{reason}: {count} ({', '.join(self._first[reason])}{more})")
        return "\n".join(lines)


def seeded_generator(*seeds: int) -> torch.Generator:
    """A CPU generator seeded by hashing the integers with numpy's ``SeedSequence`` (O'Neill's seed mixing)."""
    state = np.random.SeedSequence(list(seeds)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class ResumableBatchSampler:
    """This rank's batches of ``(epoch, sample index)`` pairs, epoch after epoch (see the module docstring)."""

    def __init__(
        self,
        length: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        _check_layout(batch_size, seed, rank, world_size)
        self.length, self.batch_size, self.seed, self.shuffle = length, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.global_batch_size = batch_size * world_size
        self.batches_per_epoch = length // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"the data source has {length} samples, fewer than one global batch of {self.global_batch_size} "
                f"({batch_size} per rank × {world_size} ranks)"
            )
        self.next_batch = start_batch

    def position_at(self, batch: int) -> dict[str, int]:
        """The saveable position of global batch number ``batch`` (counted from the first epoch)."""
        epoch, batch_in_epoch = divmod(batch, self.batches_per_epoch)
        return {"epoch": epoch, "batch": batch_in_epoch, "samples": self.length,
                "global_batch_size": self.global_batch_size, "seed": self.seed}

    def state_dict(self) -> dict[str, int]:
        return self.position_at(self.next_batch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at a saved position (from the next ``iter``); it must come from the same data and batch."""
        for name in ("samples", "global_batch_size", "seed"):
            saved, current = state.get(name), self.position_at(0)[name]
            if saved is not None and saved != current:
                raise ConfigError(
                    f"data position: saved with {name}={saved}, but this run has {name}={current}; "
                    "an exact resume needs the same data, global batch size and seed"
                )
        epoch, batch = state.get("epoch"), state.get("batch")
        if not (isinstance(epoch, int) and isinstance(batch, int) and epoch >= 0 and 0 <= batch < self.batches_per_epoch):
            raise ConfigError(f"data position: expected epoch ≥ 0 and 0 ≤ batch < {self.batches_per_epoch}, got {state!r}")
        self.next_batch = epoch * self.batches_per_epoch + batch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The order in which epoch ``epoch`` visits the samples."""
        if not self.shuffle:
            return torch.arange(self.length)
        return torch.randperm(self.length, generator=seeded_generator(self.seed, epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            epoch, first = divmod(self.next_batch, self.batches_per_epoch)
            order = self.epoch_order(epoch)
            for batch in range(first, self.batches_per_epoch):
                start = batch * self.global_batch_size + self.rank * self.batch_size
                indices = order[start : start + self.batch_size].tolist()
                self.next_batch += 1
                yield [(epoch, index) for index in indices]


def _check_layout(batch_size: int, seed: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size: {batch_size} is below 1")
    if seed < 0:
        raise ConfigError(f"seed: {seed} is negative")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} of world_size {world_size}: need 0 ≤ rank < world_size")


class TrainSamples(Dataset):
    """``dataset[(epoch, i)]`` → (pixels, caption, skips) for sample i, augmented as epoch ``epoch`` does.

    Indexed by (epoch, i) pairs (what ``ResumableBatchSampler`` yields) so that workers, which hold
    copies of this object, never need to be told the epoch. Bad samples met on the way are returned as
    ``SkipRecord``s. Under ``strict``, or when no sample at all is readable, pixels and tokens are None
    and the caller raises (an exception raised inside a worker would come back as a multi-line error).

    A source with ``load_train(index, transform, generator) -> (pixels, caption, extras)`` makes its own
    training view of a sample (a reinforced dataset: a stored augmentation, one of several captions and
    the matching stored embeddings, chosen with the sample's generator); its items carry ``extras`` (a dict
    of arrays) as a fourth element, stacked into a dict of tensors by ``collate``.
    """

    def __init__(
        self,
        source: CaptionSource,
        transform: Callable[..., torch.Tensor],
        tokenizer: Tokenizer,
        seed: int,
        strict: bool = False,
    ) -> None:
        self.source, self.transform, self.tokenizer, self.seed, self.strict = source, transform, tokenizer, seed, strict

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, ...]:
        epoch, index = item
        skipped: list[SkipRecord] = []
        for step in range(len(self.source)):
            candidate = (index + step) % len(self.source)
            try:
                pixels, caption, *extras = self._load(candidate, lambda: seeded_generator(self.seed, epoch, index))
            except InputError as error:
                skipped.append(_skip_record(self.source, candidate, error))
                if self.strict:
                    break
                continue
            return (pixels, caption, skipped, *extras)
        return None, None, skipped

    def _load(self, index: int, generator: Callable[[], torch.Generator]) -> tuple[Any, ...]:
        """(pixels, caption) or, from a source with its own training view, (pixels, caption, extras); the
        generator (of the sample asked for, also when a bad one is replaced) is made only when needed."""
        load_train = getattr(self.source, "load_train", None)
        if load_train is not None:
            return load_train(index, self.transform, generator())
        image, caption = self.source.load(index)
        # A deterministic transform draws nothing, so it is spared the generator's seeding (~25 µs).
        return self.transform(image, generator=None if isinstance(self.transform, EvalTransform) else generator()), caption

    def collate(self, items: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        """Stack pixels and tokenize the captions in one call; the skip records leave the batch as a flat list;
        the extras of a source with a training view follow as a dict of stacked tensors."""
        skipped = [record for item in items for record in item[2]]
        if any(item[0] is None for item in items):
            return None, None, skipped
        batch = (torch.stack([item[0] for item in items]), self.tokenizer([item[1] for item in items]), skipped)
        if len(items[0]) == 3:
            return batch
        return (*batch, {name: torch.as_tensor(np.stack([item[3][name] for item in items])) for name in items[0][3]})


def _multiprocessing_context(workers: int) -> str | None:
    """Fork on Linux without CUDA (fast worker start); the platform default elsewhere (all our state pickles)."""
    return "fork" if workers > 0 and sys.platform == "linux" and not torch.cuda.is_available() else None


def _dropped_records(source: CaptionSource) -> list[SkipRecord]:
    return [SkipRecord(name, reason, f"{name}: {reason}") for name, reason in source.dropped]


class TrainLoader:
    """Endless ``(pixels [B,3,H,W], tokens [B,L])`` batches for this rank (plus a dict of ``extras`` from a
    source with its own training view, see ``TrainSamples``); epochs roll over.

    ``position`` is the data position to save with a checkpoint and pass back as ``start``;
    ``skips`` reports skipped samples; ``samples_per_epoch`` counts samples over all ranks.

    The sampler is endless, so one DataLoader iteration serves every epoch: workers start once and are
    never restarted at epoch boundaries, which is what ``persistent_workers`` would buy. Without that
    flag the workers belong to the iteration and stop as soon as it is dropped or fails (a persistent
    iterator caught in a reference cycle is shut down by the garbage collector after its queues, and
    each worker then hangs for torch's 5 s join timeout).
    """

    def __init__(self, samples: TrainSamples, sampler: ResumableBatchSampler, workers: int) -> None:
        self.sampler = sampler
        self.samples_per_epoch = sampler.batches_per_epoch * sampler.global_batch_size
        self.skips = SkipReport()
        self.skips.extend(_dropped_records(samples.source))
        self._strict = samples.strict
        self._handed_out = sampler.next_batch
        self._loader = DataLoader(
            samples,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=samples.collate,
            pin_memory=torch.cuda.is_available(),
            multiprocessing_context=_multiprocessing_context(workers),
        )

    @property
    def position(self) -> dict[str, int]:
        return self.sampler.position_at(self._handed_out)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        self.sampler.next_batch = self._handed_out
        batches = iter(self._loader)
        while True:
            pixels, tokens, skipped, *extras = next(batches)  # endless: the sampler never runs out
            self.skips.extend(skipped)
            if pixels is None:
                del batches  # stop the workers now, not when the garbage collector reaches the error's traceback
                if self._strict:
                    raise InputError(skipped[0].message)
                raise InputError(f"no readable sample in the data source; the first error was: {skipped[0].message}")
            self._handed_out += 1
            yield (pixels, tokens, *extras)


def build_train_loader(
    source: CaptionSource,
    transform: Callable[..., torch.Tensor],
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    strict: bool = False,
    start: dict[str, Any] | None = None,
) -> TrainLoader:
    """This rank's endless training loader; ``batch_size`` is per rank; ``start`` a saved ``position``.

    ``transform`` is called as ``transform(image, generator=...)`` (``clipforge.preprocess.transforms.TrainTransform``).
    """
    if workers < 0:
        raise ConfigError(f"workers: {workers} is negative")
    sampler = ResumableBatchSampler(len(source), batch_size, seed=seed, rank=rank, world_size=world_size)
    if start is not None:
        sampler.load_state_dict(start)
    return TrainLoader(TrainSamples(source, transform, tokenizer, seed, strict), sampler, workers)


class EvalSamples(Dataset):
    """``dataset[i]`` → (pixels, tokens, key, None), or (None, None, key, skip record) for a bad sample."""

    def __init__(self, source: CaptionSource, transform: Callable[[Any], torch.Tensor], tokenizer: Tokenizer) -> None:
        self.source, self.transform, self.tokenizer = source, transform, tokenizer

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Any, Any, str, SkipRecord | None]:
        try:
            image, caption = self.source.load(index)
        except InputError as error:
            return None, None, self.source.key(index), _skip_record(self.source, index, error)
        return self.transform(image), self.tokenizer([caption])[0], self.source.key(index), None


def _collate_eval(items: list[tuple[Any, Any, str, SkipRecord | None]]) -> tuple[Any, Any, list[str], list[SkipRecord]]:
    good = [(pixels, tokens, key) for pixels, tokens, key, record in items if record is None]
    skipped = [record for _, _, _, record in items if record is not None]
    if not good:
        return None, None, [], skipped
    return torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good]), [g[2] for g in good], skipped


class EvalLoader:
    """One ordered pass of ``(pixels, tokens, keys)`` batches without the bad samples (counted in ``skips``)."""

    def __init__(self, samples: EvalSamples, batch_size: int, workers: int, strict: bool) -> None:
        self.skips = SkipReport()
        self.skips.extend(_dropped_records(samples.source))
        self._strict = strict
        self._loader = DataLoader(
            samples,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate_eval,
            pin_memory=torch.cuda.is_available(),
            multiprocessing_context=_multiprocessing_context(workers),
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        batches = iter(self._loader)
        while (batch := next(batches, None)) is not None:
            pixels, tokens, keys, skipped = batch
            self.skips.extend(skipped)
            if skipped and self._strict:
                del batches  # stop the workers now (see TrainLoader.__iter__)
                raise InputError(skipped[0].message)
            if keys:
                yield pixels, tokens, keys


def build_eval_loader(
    source: CaptionSource,
    transform: Callable[[Any], torch.Tensor],
    tokenizer: Tokenizer,
    batch_size: int,
    workers: int,
    *,
    strict: bool = False,
) -> EvalLoader:
    """Batches of the source in order; bad samples are skipped and counted, or raise under ``strict``."""
    if batch_size < 1 or workers < 0:
        raise ConfigError(f"batch_size {batch_size} must be ≥ 1 and workers {workers} ≥ 0")
    return EvalLoader(EvalSamples(source, transform, tokenizer), batch_size, workers, strict)
