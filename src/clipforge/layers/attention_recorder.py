"""Recording the image tower's attention through the per-block token-reduction hook (no module is patched):
attention rollout (``clipforge.explain``) and the patch attacks' attention mass (``clipforge.eval.adversarial``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from clipforge.errors import ConfigError
from clipforge.layers.attention import AttentionOutput
from clipforge.layers.token_reduction import (
    AttentionRequest,
    TokenReduction,
    TokenState,
)


class AttentionRecorder(TokenReduction):
    """A token "reduction" that keeps every block's post-softmax attention [B, heads, N, N] and reduces nothing."""

    observes_every_block = True

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[torch.Tensor] = []

    def request(self, layer: int) -> AttentionRequest:
        return AttentionRequest(weights=True)

    def forward(
        self, layer: int, x: torch.Tensor, attention: AttentionOutput, state: TokenState
    ) -> tuple[torch.Tensor, TokenState]:
        assert attention.weights is not None
        self.weights.append(attention.weights)
        return x, state


@contextmanager
def recording_attention(visual: Any) -> Iterator[AttentionRecorder]:
    """Record the attention of every block of the image tower ``visual`` while the block runs."""
    if visual.token_reduction is not None:
        raise ConfigError("attention maps need every image token: switch off token merging/pruning on this model first")
    recorder = AttentionRecorder()
    visual.token_reduction = recorder
    try:
        yield recorder
    finally:
        visual.token_reduction = None
