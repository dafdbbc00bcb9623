"""Zero-shot classification of images against labels a user types (Radford et al., "Learning Transferable
Visual Models From Natural Language Supervision", ICML 2021, §3.1.4).

Each label is the renormalised mean of its prompts (``build_zero_shot_classifier``, as open_clip's), and the
probabilities are those of open_clip's README: ``softmax(100 · image @ label.T)`` over the labels, on
L2-normalised embeddings; the same fixed scale as ``clipforge eval zeroshot`` and CLIP_benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipforge.encode import Encoder, embed_images
from clipforge.errors import InputError
from clipforge.eval.zeroshot import Template, zero_shot_head, zero_shot_logits


@dataclass
class Classification:
    """Probabilities [images read, labels]; ``kept`` are the input positions of the rows, ``skipped`` the
    unreadable inputs as (position, one-line reason)."""

    labels: list[str]
    probabilities: np.ndarray
    kept: list[int]
    skipped: list[tuple[int, str]]

    def top(self, row: int, k: int) -> list[tuple[str, float]]:
        """The ``k`` most probable labels of row ``row``, most probable first (ties: label order)."""
        order = np.argsort(-self.probabilities[row], kind="stable")[:k]
        return [(self.labels[i], float(self.probabilities[row, i])) for i in order]


def check_labels(labels: Sequence[str], source: str) -> list[str]:
    """Stripped labels; fewer than two, an empty one or a repeated one is an ``InputError`` naming ``source``."""
    cleaned = [label.strip() for label in labels]
    if len(cleaned) < 2:
        raise InputError(f"{source}: give at least two labels to choose between, got {len(cleaned)}")
    for number, label in enumerate(cleaned, start=1):
        if not label:
            raise InputError(f"{source}: label {number} is empty")
        if (first := cleaned.index(label) + 1) != number:
            raise InputError(f"{source}: label {number} repeats label {first} ({label!r})")
    return cleaned


def classify(
    model: Encoder,
    images: Sequence[Any],
    labels: Sequence[str],
    templates: Sequence[Template] = ("{c}",),
    *,
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
) -> Classification:
    """Zero-shot probabilities of each readable image in ``images`` (paths, PIL images or bytes) over ``labels``."""
    head = zero_shot_head(model, list(labels), templates)
    result = embed_images(model, images, batch_size=batch_size, workers=workers, progress=progress, description="classifying images")
    probabilities = zero_shot_logits(torch.from_numpy(result.embeddings), head).softmax(dim=-1).numpy()
    return Classification(list(labels), probabilities, result.kept, result.skipped)
