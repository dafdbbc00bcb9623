"""EViT: keep the attentive tokens, fuse the inattentive ones (Liang et al., "Not All Patches are What You Need:
Expediting Vision Transformers via Token Reorganizations", ICLR 2022).

At chosen blocks, between the attention residual and the MLP: average the class token's attention row over
heads, keep the ``ceil(keep_rate * (N - 1))`` patch tokens it attends to most (in descending order of
attention), and fuse the rest into one token, their sum weighted by the raw (not renormalised) class
attention, appended last. The class token stays first; a fused token is an ordinary token at later
reductions. Official code: youweiliang/evit 5ca95a7, ``evit.py::Attention.forward, Block.forward``;
default placement ``drop_loc=(3, 6, 9)`` of 12 blocks with ``base_keep_rate=0.7``
(``deit_*_patch16_shrink_base``). EViT tracks no token sizes, so none are kept here either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from clipforge.compress.reduction.schedules import (
    ScheduledReduction,
    keep_ratio_schedule,
    take_rows,
)
from clipforge.layers.attention import AttentionOutput
from clipforge.layers.token_reduction import AttentionRequest, TokenState


def evit_kept_count(patch_tokens: int, keep_rate: float) -> int:
    """Patch tokens EViT keeps: ``ceil(keep_rate * T)``."""
    return math.ceil(keep_rate * patch_tokens)


def default_reduction_layers(num_layers: int) -> list[int]:
    """EViT's blocks 3, 6, 9 of 12 (the 4th, 7th and 10th), scaled to other depths: ``L * i // 4``, i = 1..3."""
    return sorted({num_layers * quarter // 4 for quarter in (1, 2, 3)})


def keep_attentive_tokens(
    x: torch.Tensor, class_attention: torch.Tensor, keep: int, fuse_token: bool = True
) -> torch.Tensor:
    """Tokens ``x`` [B, N, C] (class token first) → ``[class, top-keep patches, fused?]``.

    ``class_attention`` [B, N - 1]: the class token's head-averaged attention to each patch token.
    """
    patches = x[:, 1:]
    attention, index = class_attention.topk(keep, dim=1, largest=True, sorted=True)
    kept = take_rows(patches, index)
    parts = [x[:, :1], kept]
    if fuse_token:
        # the dropped tokens' attention: the kept ones' set to zero (a float scatter, which ONNX and OpenVINO trace)
        weights = class_attention.scatter(1, index, torch.zeros_like(attention)).to(x.dtype)
        parts.append((patches * weights[..., None]).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


class EViT(ScheduledReduction):
    """EViT on the image tower.

    ``keep_rate``: a float used at ``layers`` (0-indexed; default EViT's placement scaled to the depth),
    or a per-layer list (padded with 1.0, as the official ``keep_rate`` tuple). 1.0 or ``layers=[]``
    reduces nothing. ``fuse_token``: fuse the inattentive tokens into one (on) or drop them.
    """

    def __init__(
        self,
        num_layers: int,
        keep_rate: float | Sequence[float] = 0.7,
        *,
        layers: Sequence[int] | None = None,
        fuse_token: bool = True,
    ) -> None:
        super().__init__(num_layers)
        if layers is None and isinstance(keep_rate, (int, float)):
            layers = default_reduction_layers(num_layers)
        self.keep_rate = keep_ratio_schedule(num_layers, keep_rate, layers, name="keep_rate")
        self.fuse_token = fuse_token

    def request(self, layer: int) -> AttentionRequest:
        return AttentionRequest(weights=self.keep_rate[layer] < 1.0)

    def forward(
        self, layer: int, x: torch.Tensor, attention: AttentionOutput, state: TokenState
    ) -> tuple[torch.Tensor, TokenState]:
        keep = evit_kept_count(x.shape[1] - 1, self.keep_rate[layer])
        if keep >= x.shape[1] - 1:
            return x, state
        class_attention = attention.weights[:, :, 0, 1:].mean(dim=1)
        return keep_attentive_tokens(x, class_attention, keep, self.fuse_token), state

    def tokens_after(self, layer: int, tokens: int) -> int:
        keep = evit_kept_count(tokens - 1, self.keep_rate[layer])
        if keep >= tokens - 1:
            return tokens
        return 1 + keep + int(self.fuse_token)
