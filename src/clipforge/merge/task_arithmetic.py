"""Task arithmetic: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023); official code
``mlfoundations/task_vectors`` (``src/task_vectors.py``).

A task vector is ``τᵢ = θᵢ − θ₀`` over every float entry of the state dict; the merge is
``θ = θ₀ + λ Σᵢ τᵢ``, with λ chosen on held-out data from {0.05, 0.10, …, 1.0} (the paper's grid without 0,
which is the base itself), or given (0.3 when there is neither: fusion_bench's default). The continual variant the OPCM paper compares with
(``θ ← θ + λτₜ`` as each model arrives, λ = 0.3) ends at the same weights whatever the order: it is this
merge with λ = 0.3.

What differs from the official code: it merges the image encoder only (the heads are each task's frozen
zero-shot heads); clipforge fine-tunes both towers contrastively, so both are merged. The task vectors are
summed while the models stream in (memory: the base, the sum and one model).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from clipforge.errors import InputError
from clipforge.merge.held_out import HeldOut, choose_scaling
from clipforge.merge.inputs import MergeInputs, Source, State, check_range
from clipforge.models.clip import CLIP

SCALING_GRID = tuple(round(0.05 * step, 2) for step in range(1, 21))
MAX_SCALING = 1.0
DEFAULT_SCALING = 0.3  # without held-out data: the OPCM paper's continual task arithmetic (fusion_bench's default)


@torch.no_grad()
def sum_task_vectors(inputs: MergeInputs, description: str) -> tuple[State, list[dict[str, str]]]:
    """``Σᵢ (θᵢ − θ₀)`` over the models of ``inputs`` (read one at a time) and their records."""
    total: State = {}
    records = []
    for weights in inputs.each(description):
        for key, value in weights.state.items():
            value.sub_(inputs.base[key])
            total[key] = total[key].add_(value) if key in total else value
        records.append(weights.record)
    return total, records


@torch.no_grad()
def task_arithmetic(
    base: Source,
    models: Sequence[Source],
    *,
    scaling: float | None = None,
    held_out: HeldOut | None = None,
    grid: Sequence[float] = SCALING_GRID,
    out: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> CLIP:
    """``θ₀ + λ Σᵢ τᵢ``: λ is ``scaling`` (in (0, 1]) if given, else the λ of ``grid`` that scores best on
    ``held_out`` if given, else 0.3."""
    chosen = check_scaling(scaling, held_out, grid, MAX_SCALING, DEFAULT_SCALING)
    inputs = MergeInputs(base, models, method="task-arithmetic", min_models=1, progress=progress)
    total, records = sum_task_vectors(inputs, "task vectors")
    merge = {"ingredients": records}
    result = scale_onto_base(inputs, total, chosen, held_out, grid, merge)
    return inputs.finish(result, merge, out)


def scale_onto_base(
    inputs: MergeInputs, direction: State, scaling: float | None, held_out: HeldOut | None, grid: Sequence[float], merge: dict
) -> State | CLIP:
    """``θ₀ + λ·direction`` with the given λ (in place in ``direction``), or in a probe model with the λ of
    ``grid`` that scores best on ``held_out``; records λ (and the scores) in ``merge``."""
    if scaling is None:
        probe = inputs.probe(held_out.device)
        scaling, merge["held_out_scores"] = choose_scaling(probe, inputs.base, direction, grid, held_out)
        merge["coefficients"] = {"scaling": scaling}
        return probe
    for key, value in direction.items():
        value.mul_(scaling).add_(inputs.base[key])
    merge["coefficients"] = {"scaling": scaling}
    return direction


def check_scaling(scaling: float | None, held_out: HeldOut | None, grid: Sequence[float], high: float, default: float) -> float | None:
    """The λ to use (checked): the given one, else ``default`` without held-out data; None when it is to be
    chosen on ``held_out`` over ``grid`` (checked)."""
    if scaling is None and held_out is None:
        scaling = default
    if scaling is not None:
        return check_range(scaling, 0.0, high, "scaling")
    if not grid:
        raise InputError("scaling grid: is empty")
    for value in grid:
        check_range(value, 0.0, high, "scaling grid")
    return None
