"""Model soups: the uniform and the greedy soup of Wortsman et al., "Model soups: averaging weights of
multiple fine-tuned models improves accuracy without increasing inference time" (ICML 2022); official code
``mlfoundations/model-soups`` (``main.py``).

- Uniform soup: the mean of the ingredients' weights.
- Greedy soup (the paper's Recipe 1): sort the ingredients by held-out accuracy, start from the best one and
  add each next one to the running mean if the held-out accuracy of the mean does not drop.

What differs from the official code: an ingredient is kept when the held-out accuracy does not drop (≥, as
Recipe 1 in the paper says); ``main.py`` keeps it only when it rises (>). The repository loads every
ingredient's state dict at once for the uniform soup; here the ingredients stream one at a time (memory:
the base, the running sum and one ingredient; greedy soup adds the candidate model it evaluates).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import torch

from clipforge.merge.inputs import MergeInputs, Source, State, load_weights
from clipforge.models.clip import CLIP


class Scorer(Protocol):
    """Held-out accuracy of a model (``clipforge.merge.HeldOut`` over labelled datasets)."""

    def score(self, model: CLIP) -> float: ...


@torch.no_grad()
def uniform_soup(
    base: Source, models: Sequence[Source], *, out: str | os.PathLike[str] | None = None, progress: bool = False
) -> CLIP:
    """The mean of ``models`` (≥ 2 fine-tunes of ``base``), written to ``out`` when given."""
    inputs = MergeInputs(base, models, method="uniform-soup", min_models=2, progress=progress)
    total: State = {}
    ingredients = []
    for weights in inputs.each("uniform soup"):
        for key, value in weights.state.items():
            total[key] = total[key].add_(value) if key in total else value
        ingredients.append(weights.record)
    for value in total.values():
        value.div_(len(inputs))
    coefficients = [1 / len(inputs)] * len(inputs)
    return inputs.finish(total, {"ingredients": ingredients, "coefficients": coefficients}, out)


@torch.no_grad()
def greedy_soup(
    base: Source,
    models: Sequence[Source],
    held_out: Scorer,
    *,
    out: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> CLIP:
    """The greedy soup of ``models`` (≥ 2 fine-tunes of ``base``) on ``held_out``, written to ``out`` when given.

    The provenance records each ingredient's held-out accuracy, the order they were tried in, which were
    kept, the soup's held-out accuracy and its coefficients (1/k for each of the k kept ingredients).
    """
    inputs = MergeInputs(base, models, method="greedy-soup", min_models=2, progress=progress)
    probe = inputs.probe(device)
    alone, records = [], []
    for weights in inputs.each("scoring ingredients"):
        load_weights(probe, weights.state)
        alone.append(held_out.score(probe))
        records.append(weights.record)
    order = sorted(range(len(inputs)), key=lambda index: -alone[index])  # stable: ties keep the given order
    soup: State = {}
    kept: list[int] = []
    best = alone[order[0]]
    for index, weights in zip(order, inputs.each("greedy soup", order), strict=True):
        if not kept:
            soup, kept = dict(weights.state), [index]
            continue
        size = len(kept)
        candidate = probe.state_dict()
        for key, value in weights.state.items():
            candidate[key].copy_(soup[key] * (size / (size + 1)) + value / (size + 1))
        accuracy = held_out.score(probe)
        if accuracy >= best:
            for key in soup:
                soup[key].copy_(candidate[key])
            kept.append(index)
            best = accuracy
    load_weights(probe, soup)
    ingredients = [{**record, "held_out_accuracy": round(alone[i], 6), "kept": i in kept} for i, record in enumerate(records)]
    coefficients = [1 / len(kept) if i in kept else 0.0 for i in range(len(inputs))]
    merge = {"ingredients": ingredients, "order": order, "held_out_accuracy": round(best, 6), "coefficients": coefficients}
    return inputs.finish(probe, merge, out)
