"""Relevance-guided mixed precision: more bits to the transformer blocks that matter more (LRP-QViT idea).

LRP-QViT (Ranjan & Savakis 2024) runs Layer-wise Relevance Propagation from the target-class logit, turns
each layer's total relevance into a contribution score, and gives more bits to higher-contribution layers
under an average-bit budget. Its exact LRP rules and score-to-bit formula are not public (no official
code has been released), so here:

- relevance of a block is ``Σ |a ⊙ ∂f/∂a|`` over the outputs ``a`` of its attention and MLP residual
  branches (gradient × activation, which equals LRP-0 relevance for piecewise-linear networks; Ancona et
  al., ICLR 2018), summed over the calibration set and normalised per tower;
- bits minimise the relevance-weighted quantization noise ``Σ R_l 4^(-b_l)`` at the given mean bit width.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.compress.quant.int8 import (
    Tower,
    image_batches,
    quantized_towers,
    token_batches,
)
from clipforge.encode import model_device
from clipforge.errors import ConfigError
from clipforge.models.clip import CLIP

MIN_BITS, MAX_BITS = 2, 16


def tower_blocks(model: CLIP, tower: Tower) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of a tower's blocks, named as in the model (``visual.transformer.resblocks.0``, ...)."""
    prefix = "visual.transformer.resblocks" if tower == "image" else "transformer.resblocks"
    return [(f"{prefix}.{index}", block) for index, block in enumerate(model.get_submodule(prefix))]


def block_bits(
    model: CLIP, towers: list[Tower], w_bits: int, a_bits: int, relevance: Mapping[str, float] | None
) -> dict[str, tuple[int, int]]:
    """``(w_bits, a_bits)`` of every block of ``towers``: uniform, or allocated per tower from block ``relevance``."""
    plan = {name: (w_bits, a_bits) for tower in towers for name, _ in tower_blocks(model, tower)}
    if relevance is None:
        return plan
    unknown = sorted(set(relevance) - set(plan))
    if unknown:
        raise ConfigError(f"mixed_precision: {unknown[0]!r} is not a block of the quantized towers")
    for tower in towers:
        scores = {name: relevance[name] for name, _ in tower_blocks(model, tower) if name in relevance}
        if scores:
            weight_bits, activation_bits = allocate_bits(scores, w_bits), allocate_bits(scores, a_bits)
            plan.update({name: (weight_bits[name], activation_bits[name]) for name in scores})
    return plan


def allocate_bits(relevance: Mapping[str, float], average_bits: int) -> dict[str, int]:
    """Integer bits per layer with mean ``average_bits`` minimising ``Σ R_l 4^(-b_l)`` (noise ∝ 4^-b, weighted by relevance).

    Greedy marginal allocation from ``MIN_BITS`` (optimal here: each layer's gain per added bit shrinks);
    equal relevance gives every layer ``average_bits``.
    """
    names = list(relevance)
    if any(not math.isfinite(score) or score < 0 for score in relevance.values()):
        raise ConfigError("mixed_precision: relevance scores must be finite and non-negative")
    bits = dict.fromkeys(names, MIN_BITS)
    gains = [(-relevance[name] * 0.75 * 4.0**-MIN_BITS, index, name) for index, name in enumerate(names)]
    heapq.heapify(gains)
    for _ in range((average_bits - MIN_BITS) * len(names)):
        _, index, name = heapq.heappop(gains)
        bits[name] += 1
        if bits[name] < MAX_BITS:
            heapq.heappush(gains, (-relevance[name] * 0.75 * 4.0 ** -bits[name], index, name))
    return bits


def block_relevance(
    model: CLIP,
    calibration_batches: Iterable[torch.Tensor],
    *,
    text_batches: Iterable[torch.Tensor] | None = None,
    class_embeddings: torch.Tensor | None = None,
) -> dict[str, float]:
    """Each block's share of its tower's output: ``Σ |a ⊙ ∂f/∂a|`` over the block's attention and MLP branch outputs.

    ``f`` is, for images, the logit of the predicted class when ``class_embeddings`` [C, D] (normalised text
    embeddings of the class prompts) are given, as LRP-QViT explains the target-class logit; otherwise (and
    for text) the norm of the embedding. Scores of each tower sum to 1. The model is not changed.
    """
    towers = quantized_towers(text_batches)
    blocks = {tower: tower_blocks(model, tower) for tower in towers}
    scores = {name: 0.0 for tower in towers for name, _ in blocks[tower]}
    device = model_device(model)
    branches: list[tuple[str, torch.Tensor]] = []
    hooks = [
        branch.register_forward_hook(lambda module, inputs, output, name=name: branches.append((name, output)))
        for tower in towers
        for name, block in blocks[tower]
        for branch in (block.ls_1, block.ls_2)
    ]
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(True)
        with torch.enable_grad():
            for pixels in image_batches(calibration_batches):
                _add_relevance(scores, branches, model.encode_image(pixels.to(device)), class_embeddings)
            for tokens in token_batches(text_batches) if text_batches is not None else ():
                _add_relevance(scores, branches, model.encode_text(tokens.to(device)), None)
    finally:
        for hook in hooks:
            hook.remove()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
    relevance = {}
    for tower in towers:
        total = sum(scores[name] for name, _ in blocks[tower])
        relevance.update({name: scores[name] / total if total > 0 else 0.0 for name, _ in blocks[tower]})
    return relevance


def _add_relevance(
    scores: dict[str, float],
    branches: list[tuple[str, torch.Tensor]],
    features: torch.Tensor,
    class_embeddings: torch.Tensor | None,
) -> None:
    """Add ``Σ |a ⊙ ∂f/∂a|`` of the branch outputs ``a`` captured while computing ``features``."""
    grads = torch.autograd.grad(_relevance_target(features, class_embeddings), [output for _, output in branches])
    for (name, output), grad in zip(branches, grads, strict=True):
        scores[name] += float((output.detach() * grad).abs().sum())
    branches.clear()


def _relevance_target(features: torch.Tensor, class_embeddings: torch.Tensor | None) -> torch.Tensor:
    if class_embeddings is None:
        return (features * F.normalize(features, dim=-1).detach()).sum()
    logits = F.normalize(features, dim=-1) @ class_embeddings.to(features).T
    return logits.max(dim=-1).values.sum()
