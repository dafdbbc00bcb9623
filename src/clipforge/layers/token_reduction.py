"""The token-reduction hook of the image tower.

Every image block calls its model's ``TokenReduction`` between attention and MLP. The base class
does nothing; token merging (ToMe, PiToMe), pruning (EViT) and early exit subclass it and become
options of the model rather than patches of its classes. A reduction may ask the attention for its
keys or weights at a layer, add a bias to the attention logits (ToMe's proportional attention), and
carry per-token state (sizes) from block to block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clipforge.layers.attention import AttentionOutput


@dataclass
class TokenState:
    """What a reduction carries between blocks."""

    size: torch.Tensor | None = None  # [B, N, 1]: how many input patches each token stands for
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AttentionRequest:
    keys: bool = False
    weights: bool = False


class TokenReduction(nn.Module):
    """Identity reduction; subclasses override what they need."""

    observes_every_block: bool = False
    """True for hooks that must see every block whole (attention recorders). Otherwise a tower pooling
    its class token runs the last block on that token alone and skips the hook there: nothing after
    the last block reads the other tokens, so reducing them could not change the output."""

    def start(self, x: torch.Tensor) -> TokenState:
        """Called once with the tokens entering the first block."""
        return TokenState()

    def request(self, layer: int) -> AttentionRequest:
        """What the attention of block ``layer`` must return."""
        return AttentionRequest()

    def attention_bias(self, layer: int, state: TokenState) -> torch.Tensor | None:
        """An additive bias for the attention logits of block ``layer``, broadcast to [B, H, N, N]."""
        return None

    def forward(
        self, layer: int, x: torch.Tensor, attention: AttentionOutput, state: TokenState
    ) -> tuple[torch.Tensor, TokenState]:
        """Reduce the tokens ``x`` [B, N, D] after the attention residual of block ``layer``."""
        return x, state
