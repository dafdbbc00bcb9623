"""The input of exit-head training and evaluation: a dataset's images as preprocessed pixel batches, in order."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from clipforge.data.formats.images import read_rgb_image
from clipforge.encode import Encoder


def pixel_batches(
    model: Encoder, images: Sequence[Any], batch_size: int, forever: bool = False, advance: Callable[[], Any] | None = None
) -> Iterator[torch.Tensor]:
    """Batches [B, 3, H, W] of ``model.preprocess``ed images in order (cycling when ``forever``), calling
    ``advance()`` as each is handed out. ``images`` are dataset entries (PIL images, paths or bytes)."""
    starts = range(0, len(images), batch_size)
    for start in itertools.cycle(starts) if forever else starts:
        batch = torch.stack([model.preprocess(read_rgb_image(image)) for image in images[start : start + batch_size]])
        if advance is not None:
            advance()
        yield batch
