"""Batched embedding of many images or strings, with worker processes for decoding and a progress bar.

Bad images (missing, corrupt, truncated, decompression bombs) are skipped and reported by name, or fail
at once under ``strict``; the embeddings of the good ones keep their input order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clipforge.errors import InputError
from clipforge.imageio import open_image
from clipforge.progress import progress_bar


@dataclass
class EmbeddingResult:
    embeddings: np.ndarray  # [n_kept, embed_dim] float32, L2-normalised
    kept: list[int]  # input positions the rows belong to
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (position, one-line reason)


class _ImageFiles(Dataset):
    def __init__(self, sources: Sequence[Any], transform: Callable[[Any], torch.Tensor]) -> None:
        self.sources = sources
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        source = self.sources[index]
        try:
            image = source if hasattr(source, "convert") else open_image(source)
            return index, self.transform(image), None
        except InputError as error:
            return index, None, str(error)


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    pixels = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, bad


def default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


@torch.inference_mode()
def embed_images(
    model: Any,
    images: Sequence[str | Path | Any],
    *,
    batch_size: int = 64,
    workers: int | None = None,
    strict: bool = False,
    progress: bool = True,
) -> EmbeddingResult:
    """Embed PIL images or image paths with ``model.preprocess``; decoding runs in ``workers`` processes."""
    workers = default_workers() if workers is None else workers
    loader = DataLoader(
        _ImageFiles(images, model.preprocess),
        batch_size=batch_size,
        num_workers=workers if len(images) > batch_size else 0,
        collate_fn=_collate,
    )
    device = next(model.parameters()).device
    rows, kept, skipped = [], [], []
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("embedding images", total=len(images), unit="img")
        for positions, pixels, bad in loader:
            if bad and strict:
                raise InputError(bad[0][1])
            skipped.extend(bad)
            if pixels is not None:
                rows.append(model.encode_image(pixels.to(device), normalize=True).float().cpu())
                kept.extend(positions)
            bar.advance(task, len(positions) + len(bad))
    dim = model.config.embed_dim
    embeddings = torch.cat(rows).numpy() if rows else np.zeros((0, dim), np.float32)
    return EmbeddingResult(embeddings, kept, skipped)


@torch.inference_mode()
def embed_texts(model: Any, texts: Sequence[str], *, batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """Embed strings; empty or non-string items raise ``InputError`` naming their position."""
    for position, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"text #{position}: empty or not a string ({text!r})")
    device = next(model.parameters()).device
    rows = []
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("embedding texts", total=len(texts), unit="text")
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            rows.append(model.encode_text(model.tokenize(chunk).to(device), normalize=True).float().cpu())
            bar.advance(task, len(chunk))
    return torch.cat(rows).numpy() if rows else np.zeros((0, model.config.embed_dim), np.float32)
