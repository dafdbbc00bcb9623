"""Attention rollout: Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020.

Each block's attention, fused over heads, is mixed with the identity for the residual connection
(0.5 A + 0.5 I), row-normalised, and the blocks are multiplied from the first to the last; the class
token's row over the patch tokens is the map. Head fusion (mean, as the paper; max or min) and the
optional ``discard_ratio`` (zero the weakest fraction of fused attention entries, keeping every
token's attention to the class token) follow jacobgil/vit-explain ``vit_rollout.py``.

The weights come from the image tower's own attention (``return_weights``) through the per-block
token-reduction hook, so no module is patched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from clipforge.encode import Encoder, encode_pixels
from clipforge.errors import InputError
from clipforge.layers.attention_recorder import recording_attention

HEAD_FUSIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": lambda weights: weights.mean(dim=1),
    "max": lambda weights: weights.amax(dim=1),
    "min": lambda weights: weights.amin(dim=1),
}
"""How the heads of a block's attention [B, heads, N, N] become one [B, N, N] map."""


@torch.inference_mode()
def attention_weights(model: Encoder, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Post-softmax attention [B, heads, N, N] (float32) of every image block for preprocessed ``pixels``."""
    with recording_attention(model.visual) as recorder:
        encode_pixels(model, pixels, batch_size=len(pixels))
    return [weights.float() for weights in recorder.weights]


def rollout(attentions: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    """The rolled-out attention [B, N, N] of blocks given first to last, each [B, heads, N, N]."""
    if head_fusion not in HEAD_FUSIONS:
        raise InputError(f"head_fusion: {head_fusion!r} is not one of {', '.join(HEAD_FUSIONS)}")
    if not 0 <= discard_ratio < 1:
        raise InputError(f"discard_ratio: {discard_ratio} is not in [0, 1)")
    if not attentions:
        raise InputError("rollout: no attention maps")
    batch, _, tokens, _ = attentions[0].shape
    identity = torch.eye(tokens, dtype=torch.float64, device=attentions[0].device)
    result = identity.expand(batch, tokens, tokens)
    for weights in attentions:
        fused = HEAD_FUSIONS[head_fusion](weights.double())
        if discard_ratio > 0:
            fused = _discard_weakest(fused, discard_ratio)
        mixed = 0.5 * fused + 0.5 * identity
        result = (mixed / mixed.sum(dim=-1, keepdim=True)) @ result
    return result


def _discard_weakest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the ``ratio`` weakest entries of each [N, N] map, never an entry of the class-token column."""
    patches = fused[:, :, 1:].reshape(len(fused), -1)
    count = int(fused[0].numel() * ratio)
    weakest = patches.topk(min(count, patches.shape[1]), dim=-1, largest=False).indices
    kept = fused.clone()
    kept[:, :, 1:] = patches.scatter(1, weakest, 0.0).view_as(fused[:, :, 1:])
    return kept


def attention_rollout(model: Encoder, pixels: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    """Class-token rollout over the patch grid [B, grid_h, grid_w], each map scaled to a maximum of 1."""
    rolled = rollout(attention_weights(model, pixels), head_fusion, discard_ratio)
    patch = model.visual.patch_size
    grid = rolled[:, 0, 1:].reshape(len(rolled), pixels.shape[-2] // patch, pixels.shape[-1] // patch)
    return (grid / grid.amax(dim=(-2, -1), keepdim=True)).float()
