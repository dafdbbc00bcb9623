"""Held-out accuracy for the merges that choose on data: greedy soup's ingredients, the scaling λ of task
arithmetic and TIES.

A score is the mean zero-shot top-1 accuracy (``clipforge.eval``'s ``Evaluator.zeroshot``) over one or more
labelled datasets, e.g. each task's validation split. Keep these sets apart from the test sets the merged
model is reported on: the choice is made on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clipforge.errors import InputError
from clipforge.eval.datasets import ClassificationDataset
from clipforge.eval.runner import Evaluator
from clipforge.merge.inputs import State
from clipforge.models.clip import CLIP


@dataclass(frozen=True)
class HeldOut:
    """Datasets to score a model on, and how to encode them (batch size, decoding processes, device)."""

    datasets: Sequence[ClassificationDataset]
    batch_size: int = 256
    workers: int | None = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.datasets:
            raise InputError("held-out data: no dataset given (pass at least one, e.g. --data DIR)")
        for dataset in self.datasets:  # one class: every model scores 1.0, so nothing is chosen
            if len(dataset.classnames) < 2:
                raise InputError(f"{dataset.name}: held-out data needs at least 2 classes (found {len(dataset.classnames)}: "
                                 f"{', '.join(dataset.classnames)})")

    def score(self, model: CLIP) -> float:
        """Mean zero-shot top-1 accuracy of ``model`` over the datasets."""
        evaluator = Evaluator(model, batch_size=self.batch_size, workers=self.workers)
        return float(np.mean([evaluator.zeroshot(dataset).metrics["acc1"] for dataset in self.datasets]))


@torch.no_grad()
def choose_scaling(
    probe: CLIP, base: State, direction: State, grid: Sequence[float], held_out: HeldOut
) -> tuple[float, dict[float, float]]:
    """The λ of ``grid`` whose ``θ₀ + λ·direction`` scores best on ``held_out`` (the smallest on ties), and
    every λ's score; ``probe`` is left holding the chosen weights."""
    scores = {}
    for scaling in grid:
        set_scaled(probe, base, direction, scaling)
        scores[float(scaling)] = round(held_out.score(probe), 6)
    best = max(scores, key=lambda scaling: (scores[scaling], -scaling))
    set_scaled(probe, base, direction, best)
    return best, scores


@torch.no_grad()
def set_scaled(model: CLIP, base: State, direction: State, scaling: float) -> None:
    """Load ``θ₀ + scaling·direction`` into ``model``, one tensor at a time."""
    own = model.state_dict()
    for key, value in direction.items():
        own[key].copy_(torch.add(base[key], value, alpha=scaling))
