"""Batched embedding of many images or strings, with worker processes for decoding and a progress bar.

Bad images (missing, corrupt, truncated, decompression bombs) are skipped and reported by name, or fail
at once under ``strict``; the embeddings of the good ones keep their input order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clipforge._util.progress import progress_bar
from clipforge.errors import InputError
from clipforge.retrieval.inputs import ImageItem, read_image


@dataclass
class EmbeddingResult:
    embeddings: np.ndarray  # [n_kept, embed_dim] float32, L2-normalised
    kept: list[int]  # input positions the rows belong to
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (position, one-line reason)


class _Images(Dataset):
    """Decodes and preprocesses one image per index; runs inside the DataLoader's worker processes."""

    def __init__(self, sources: Sequence[Any], transform: Callable[[Any], torch.Tensor]) -> None:
        self.sources = sources
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.transform(read_image(self.sources[index])), None
        except InputError as error:
            return index, None, str(error)


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    pixels = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, bad


def default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def encode_image_batches(
    model: Any, sources: Sequence[str | Path | ImageItem | Any], batches: Sequence[Sequence[int]], workers: int, strict: bool = False
) -> Iterator[tuple[list[int], torch.Tensor, list[tuple[int, str]]]]:
    """For each batch of source positions, in order: (kept positions, their float32 embeddings on the CPU, skipped).

    Decoding and ``model.preprocess`` run in ``workers`` processes (none when 0) while the model encodes
    the previous batch. Under ``strict`` the first unreadable image raises its ``InputError``.
    """
    device = model_device(model)
    loader = DataLoader(
        _Images(sources, model.preprocess),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    empty = torch.zeros((0, model.config.embed_dim))
    for positions, pixels, bad in loader:
        if bad and strict:
            raise InputError(bad[0][1])
        vectors = empty if pixels is None else model.encode_image(pixels.to(device), normalize=True).float().cpu()
        yield positions, vectors, bad


def fixed_batches(count: int, batch_size: int) -> list[range]:
    return [range(start, min(count, start + batch_size)) for start in range(0, count, batch_size)]


def embed_images(
    model: Any,
    images: Sequence[str | Path | ImageItem | Any],
    *,
    batch_size: int = 64,
    workers: int | None = None,
    strict: bool = False,
    progress: bool = True,
) -> EmbeddingResult:
    """Embed PIL images, image paths or ``ImageItem``s with ``model.preprocess``; decoding runs in ``workers`` processes."""
    workers = default_workers() if workers is None else workers
    batches = fixed_batches(len(images), batch_size)
    rows, kept, skipped = [], [], []
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("embedding images", total=len(images), unit="img")
        for positions, vectors, bad in encode_image_batches(model, images, batches, workers if len(batches) > 1 else 0, strict):
            skipped.extend(bad)
            rows.append(vectors)
            kept.extend(positions)
            bar.advance(task, len(positions) + len(bad))
    embeddings = torch.cat(rows).numpy() if rows else np.zeros((0, model.config.embed_dim), np.float32)
    return EmbeddingResult(embeddings, kept, skipped)


def check_texts(texts: Sequence[Any]) -> None:
    """``InputError`` naming the position of the first empty or non-string text."""
    for position, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"text #{position}: empty or not a string ({text!r})")


@torch.inference_mode()
def encode_texts(model: Any, texts: Sequence[str]) -> torch.Tensor:
    """One batch of strings → float32 L2-normalised embeddings on the CPU."""
    tokens = model.tokenize(list(texts)).to(model_device(model))
    return model.encode_text(tokens, normalize=True).float().cpu()


def embed_texts(model: Any, texts: Sequence[str], *, batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """Embed strings; empty or non-string items raise ``InputError`` naming their position."""
    check_texts(texts)
    rows = []
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("embedding texts", total=len(texts), unit="text")
        for chunk in fixed_batches(len(texts), batch_size):
            rows.append(encode_texts(model, [texts[i] for i in chunk]))
            bar.advance(task, len(chunk))
    return torch.cat(rows).numpy() if rows else np.zeros((0, model.config.embed_dim), np.float32)
