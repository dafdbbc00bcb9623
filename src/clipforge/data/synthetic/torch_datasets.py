"""PyTorch datasets over the synthetic world: an endless stream sharded by rank and worker, and a
fixed-size map-style view. Both yield ``(image, caption)``, each passed through an optional transform
(e.g. ``model.preprocess`` and ``model.tokenize``-per-caption)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from clipforge.data.synthetic.config import Shift
from clipforge.data.synthetic.world import SyntheticWorld

Transform = Callable[[Any], Any] | None


def _pair(
    world: SyntheticWorld,
    split: str,
    index: int,
    shift: str | Shift | None,
    image_transform: Transform,
    text_transform: Transform,
) -> tuple[Any, Any]:
    sample = world.sample(split, index, shift)
    image = image_transform(sample.image) if image_transform else sample.image
    text = text_transform(sample.caption) if text_transform else sample.caption
    return image, text


class SyntheticStream(IterableDataset):
    """Samples ``start, start + 1, …`` (up to ``stop``, or forever), split without overlap across
    distributed ranks and DataLoader workers: reader r of R reads indices ``start + r, start + r + R, …``.

    ``rank`` and ``world_size`` default to torch.distributed's when it is initialised, else 0 and 1.
    """

    def __init__(
        self,
        world: SyntheticWorld,
        split: str,
        start: int = 0,
        stop: int | None = None,
        *,
        shift: str | Shift | None = None,
        image_transform: Transform = None,
        text_transform: Transform = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.world, self.split, self.start, self.stop, self.shift = world, split, start, stop, shift
        self.image_transform, self.text_transform = image_transform, text_transform
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        readers = self.world_size * workers
        first = self.start + self.rank * workers + worker_id
        indices = itertools.count(first, readers) if self.stop is None else range(first, self.stop, readers)
        for index in indices:
            yield _pair(self.world, self.split, index, self.shift, self.image_transform, self.text_transform)


class SyntheticDataset(Dataset):
    """The first ``size`` samples of a split as a map-style dataset (for shuffling samplers and evaluation)."""

    def __init__(
        self,
        world: SyntheticWorld,
        split: str,
        size: int,
        *,
        shift: str | Shift | None = None,
        image_transform: Transform = None,
        text_transform: Transform = None,
    ) -> None:
        self.world, self.split, self.size, self.shift = world, split, size, shift
        self.image_transform, self.text_transform = image_transform, text_transform

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} is outside the {self.size} samples of this dataset")
        return _pair(self.world, self.split, index, self.shift, self.image_transform, self.text_transform)
