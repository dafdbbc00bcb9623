"""OPCM, continual merging with orthogonal projections: Tang et al., "Merging Models on the Fly Without
Retraining: A Sequential Approach to Scalable Continual Model Merging" (NeurIPS 2025); official code
``tanganke/fusion_bench`` (``fusion_bench/method/opcm/opcm.py``), first released as ``tanganke/opcm``.

Models arrive one at a time; only the base, the merged model and the current model are held. With
``τ̄`` the merged task vector so far and ``τₜ = θₜ − θ₀`` the new one:

1. for each linear map's weight matrix, take the SVD ``τ̄ = U S Vᵀ`` and the coordinates ``P = Uᵀ τₜ V``;
   zero the diagonal of ``P`` (the components along each ``uᵢvᵢᵀ``) and its top-left ``r × r`` block, ``r``
   being the first index at which the cumulative share of the singular values ``Σσ`` exceeds ``alpha``;
   ``τₜ ← U P Vᵀ`` (its part orthogonal to ``τ̄``'s dominant subspace). Other entries (biases, LayerNorm,
   embeddings, the patch convolution, the logit scale) are added without projection;
2. ``θ⁽ᵗ⁾ = θ₀ + (λₜ₋₁ τ̄ + τₜ) / λₜ`` with ``λₜ`` such that ``‖θ⁽ᵗ⁾ − θ₀‖`` is the mean of the task-vector
   norms ``‖τ₁‖ … ‖τₜ‖`` (each over the whole model, as one vector); ``λ₁ = 1`` (``θ⁽¹⁾ = θ₁``).

``zero_diagonal`` (default True) is the fix of fusion_bench commit 2c3df13 (March 2025): the first
release wrote ``projected.diag().fill_(0)``, which fills a copy and so removed only the ``r × r`` block; the
paper's arXiv v1 numbers come from that version (``zero_diagonal=False``).

What differs from the official code: the linear maps are the same as in its Hugging Face CLIP models — the
fused ``in_proj_weight`` is projected as its three matrices (q, k and v are separate ``nn.Linear`` there),
and the two embedding projections count as linear maps. The SVD is the reduced one (``τₜ − U_k (P_k ⊙ M) V_kᵀ``
equals the full-matrix computation, since only the first ``k = min(m, n)`` coordinates are zeroed). A matrix
the merged model has not changed (``τ̄ = 0``) has no subspace to project from and is added as it is (the
official code would zero the diagonal of whatever basis its SVD returns). A previous OPCM merge of the same
base may come first among the models: the merge then continues from its recorded state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from clipforge.errors import InputError
from clipforge.layers.attention import Attention
from clipforge.merge.inputs import (
    MergeInputs,
    Source,
    Weights,
    check_range,
    task_vector_norm,
)
from clipforge.models.clip import CLIP

EMBEDDING_PROJECTIONS = ("visual.proj", "text_projection")


def linear_maps(model: CLIP) -> dict[str, int]:
    """State-dict keys of the model's linear maps → the number of matrices stacked in their rows."""
    maps = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            maps[f"{name}.weight"] = 1
        elif isinstance(module, Attention):
            maps[f"{name}.in_proj_weight"] = 3
    maps.update({key: 1 for key in EMBEDDING_PROJECTIONS if key in model.state_dict()})
    return maps


def project_out(merged: torch.Tensor, task: torch.Tensor, alpha: float, zero_diagonal: bool = True) -> torch.Tensor:
    """``task`` without its coordinates on the diagonal and in the dominant ``r × r`` block of ``merged``'s
    singular bases (step 1 of the module docstring); ``merged`` and ``task`` are matrices of one shape."""
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    if float(s.sum()) == 0.0:
        return task
    split = int(((s.cumsum(0) / s.sum()) > alpha).float().argmax())
    coordinates = u.T @ task @ vh.T
    removed = torch.zeros_like(coordinates, dtype=torch.bool)
    removed[:split, :split] = True
    if zero_diagonal:
        removed.diagonal().fill_(True)
    return task - u @ (coordinates * removed) @ vh


def _project(merged: torch.Tensor, task: torch.Tensor, blocks: int, alpha: float, zero_diagonal: bool, device: Any) -> torch.Tensor:
    parts = [
        project_out(m.to(device), t.to(device), alpha, zero_diagonal).cpu()
        for m, t in zip(merged.chunk(blocks), task.chunk(blocks), strict=True)
    ]
    return torch.cat(parts)


@torch.no_grad()
def opcm(
    base: Source,
    models: Sequence[Source],
    *,
    alpha: float = 0.5,
    zero_diagonal: bool = True,
    device: str | torch.device = "cpu",
    out: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> CLIP:
    """OPCM of ``models`` in their order of arrival (fine-tunes of ``base``; the first may be an earlier OPCM
    merge to continue); ``alpha`` in (0, 1] sets the dominant subspace, ``device`` runs the SVDs."""
    check_range(alpha, 0.0, 1.0, "alpha")
    inputs = MergeInputs(base, models, method="opcm", min_models=1, progress=progress)
    maps = linear_maps(inputs.template)
    stream = inputs.each("OPCM")
    first = next(stream)
    merged = dict(first.state)
    history = _history(first, alpha, zero_diagonal)
    norms, scalings, ingredients = history or ([task_vector_norm(merged, inputs.base)], [1.0], [first.record])
    for weights in stream:
        task_norm = task_vector_norm(weights.state, inputs.base)
        for key, value in weights.state.items():
            merged_update = merged[key].sub_(inputs.base[key])
            task_update = value.sub_(inputs.base[key])
            if key in maps:
                task_update = _project(merged_update, task_update, maps[key], alpha, zero_diagonal, device)
            merged_update.mul_(scalings[-1]).add_(task_update)
        norms.append(task_norm)
        mean_norm = sum(norms) / len(norms)
        merged_norm = sum(float(value.pow(2).sum()) for value in merged.values()) ** 0.5
        scaling = merged_norm / mean_norm if merged_norm > 0 and mean_norm > 0 else 1.0
        for key, value in merged.items():
            value.div_(scaling).add_(inputs.base[key])
        scalings.append(scaling)
        ingredients.append(weights.record)
    record = {
        "ingredients": ingredients,
        "order_of_arrival": [item["source"] for item in ingredients],
        "coefficients": {"alpha": alpha, "zero_diagonal": zero_diagonal, "lambdas": scalings},
        "task_vector_norms": norms,
    }
    return inputs.finish(merged, record, out)


def _history(first: Weights, alpha: float, zero_diagonal: bool) -> tuple[list, list, list] | None:
    """(norms, λs, ingredients) of the earlier OPCM merge ``first`` is (its base was checked on reading), else None."""
    merge = first.provenance.get("merge")
    if not isinstance(merge, dict) or merge.get("method") != "opcm":
        return None
    settings = merge["coefficients"]
    if (settings["alpha"], settings["zero_diagonal"]) != (alpha, zero_diagonal):
        raise InputError(
            f"{first.name}: an OPCM merge with alpha={settings['alpha']}, zero_diagonal={settings['zero_diagonal']}; "
            "continue it with the same settings"
        )
    return list(merge["task_vector_norms"]), list(settings["lambdas"]), list(merge["ingredients"])
