"""TIES-merging: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023);
official code ``prateeky2806/ties-merging`` (``src/ties_merging.py``, ``src/utils/merge_utils.py``).

1. Trim: each task vector ``τᵢ = θᵢ − θ₀`` keeps the ``keep`` fraction (default 20%) of its entries with the
   largest magnitude, counted over the whole model. As ``topk_values_mask`` does, with d entries and
   ``k = ⌊keep·d⌋``, an entry survives when ``|τ|`` is at least the (d − k)-th smallest magnitude (so k + 1
   entries when the magnitudes are distinct).
2. Elect: the sign of each entry is the sign of the sum of the trimmed task vectors (``resolve_sign``,
   "mass"); entries where that sum is 0 take the sign held by most entries ("majority").
3. Disjoint mean: each entry is the mean of the trimmed values that agree with the elected sign
   (``disjoint_merge``, "dis-mean"); ``θ = θ₀ + λ·merged``, λ = 1 by default or chosen on held-out data
   from {0.8, 0.9, …, 2.5} (the repository's README sweep).

What differs from the official code: it flattens all task vectors into one (tasks × parameters) matrix;
here the models stream through twice — once to find each one's trim threshold and sum the trimmed vectors,
once to add up the entries that agree with the elected signs — so memory holds the base, the elected signs,
the running sum and count, and one model, whatever the number of models.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from clipforge.merge.held_out import HeldOut
from clipforge.merge.inputs import MergeInputs, Source, State, check_range
from clipforge.merge.task_arithmetic import check_scaling, scale_onto_base
from clipforge.models.clip import CLIP

SCALING_GRID = tuple(round(0.8 + 0.1 * step, 1) for step in range(18))
MAX_SCALING = 3.0
DEFAULT_SCALING = 1.0
DEFAULT_KEEP = 0.2


def trim_threshold(task_vector: State, keep: float) -> float:
    """The magnitude at or above which an entry of ``task_vector`` survives trimming to its top ``keep``."""
    magnitudes = torch.cat([value.abs().flatten() for value in task_vector.values()]).numpy()
    dropped = magnitudes.size - int(magnitudes.size * keep)
    if dropped < 1:
        return 0.0
    magnitudes.partition(dropped - 1)  # in place (torch's kthvalue would hold a copy and int64 indices too)
    return float(magnitudes[dropped - 1])


def trimmed(value: torch.Tensor, threshold: float) -> torch.Tensor:
    return value * (value.abs() >= threshold)


def elect_signs(mass: State) -> State:
    """+1/−1 per entry: the sign of the summed trimmed task vectors; zeros take the sign most entries have."""
    signs = {key: torch.sign(value).to(torch.int8) for key, value in mass.items()}
    majority = 1 if sum(int(value.sum(dtype=torch.int64)) for value in signs.values()) >= 0 else -1
    for value in signs.values():
        value[value == 0] = majority
    return signs


@torch.no_grad()
def ties(
    base: Source,
    models: Sequence[Source],
    *,
    keep: float = DEFAULT_KEEP,
    scaling: float | None = None,
    held_out: HeldOut | None = None,
    grid: Sequence[float] = SCALING_GRID,
    out: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> CLIP:
    """TIES-merging of ``models`` (fine-tunes of ``base``): trim to ``keep`` in (0, 1], elect signs, disjoint
    mean; λ is ``scaling`` (in (0, 3]) if given, else chosen on ``held_out`` if given, else 1."""
    check_range(keep, 0.0, 1.0, "keep")
    chosen = check_scaling(scaling, held_out, grid, MAX_SCALING, DEFAULT_SCALING)
    inputs = MergeInputs(base, models, method="ties", min_models=1, progress=progress)
    thresholds, records = [], []
    mass: State = {}
    for weights in inputs.each("TIES: trimming"):
        for key, value in weights.state.items():
            value.sub_(inputs.base[key])
        thresholds.append(trim_threshold(weights.state, keep))
        for key, value in weights.state.items():
            mass[key] = mass[key].add_(trimmed(value, thresholds[-1])) if key in mass else trimmed(value, thresholds[-1])
        records.append(weights.record)
    signs = elect_signs(mass)
    del mass
    total = {key: torch.zeros_like(inputs.base[key]) for key in signs}
    count = {key: torch.zeros_like(value, dtype=torch.int16) for key, value in signs.items()}
    for threshold, weights in zip(thresholds, inputs.each("TIES: disjoint mean"), strict=True):
        for key, value in weights.state.items():
            value = trimmed(value.sub_(inputs.base[key]), threshold)
            agrees = torch.where(signs[key] > 0, value > 0, value < 0)
            total[key].add_(value * agrees)
            count[key].add_(agrees)
    for key, value in total.items():
        value.div_(count[key].clamp_min(1))
    merge = {"ingredients": records, "trim_thresholds": thresholds}
    result = scale_onto_base(inputs, total, chosen, held_out, grid, merge)
    merge["coefficients"] = {**merge["coefficients"], "keep": keep}
    return inputs.finish(result, merge, out)
