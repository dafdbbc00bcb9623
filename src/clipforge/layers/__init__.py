"""Reusable building blocks of the two towers."""

from clipforge.layers.attention import Attention, AttentionOutput
from clipforge.layers.mlp import Mlp, QuickGELU
from clipforge.layers.token_reduction import (
    AttentionRequest,
    TokenReduction,
    TokenState,
)
from clipforge.layers.transformer import ResidualAttentionBlock, Transformer

__all__ = [
    "Attention",
    "AttentionOutput",
    "AttentionRequest",
    "Mlp",
    "QuickGELU",
    "ResidualAttentionBlock",
    "TokenReduction",
    "TokenState",
    "Transformer",
]
