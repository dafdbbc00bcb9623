"""Pre-norm residual attention blocks and the block stack shared by both towers (open_clip layout)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipforge.layers.attention import Attention
from clipforge.layers.mlp import Mlp
from clipforge.layers.prompts import PromptTokens
from clipforge.layers.token_reduction import TokenReduction, TokenState


class LayerScale(nn.Module):
    """Per-channel residual scaling (CaiT); used by open_clip's ``-alt`` configs via ``ls_init_value``."""

    def __init__(self, width: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def _layer_scale(width: int, init_value: float | None) -> nn.Module:
    return LayerScale(width, init_value) if init_value is not None else nn.Identity()


class ResidualAttentionBlock(nn.Module):
    """``x + attn(ln_1(x))``, then the token-reduction hook, then ``x + mlp(ln_2(x))``.

    With ``first_token_only`` the block returns just its first token [B, 1, D]: that token attends to
    all of them, and the attention output projection, the MLP and the hook are spent on it alone.
    """

    def __init__(
        self, width: int, heads: int, mlp_ratio: float, activation: str, ls_init_value: float | None = None
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ls_1 = _layer_scale(width, ls_init_value)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), activation)
        self.ls_2 = _layer_scale(width, ls_init_value)

    def forward(
        self,
        x: torch.Tensor,
        *,
        is_causal: bool = False,
        reduction: TokenReduction | None = None,
        layer: int = 0,
        state: TokenState | None = None,
        first_token_only: bool = False,
    ) -> tuple[torch.Tensor, TokenState | None]:
        if first_token_only:
            bias = reduction.attention_bias(layer, state) if reduction is not None else None
            attention = self.attn(self.ln_1(x), bias, is_causal=is_causal, first_query_only=True)
            x = x[:, :1] + self.ls_1(attention.out)
        elif reduction is None:
            x = x + self.ls_1(self.attn(self.ln_1(x), is_causal=is_causal).out)
        else:
            wanted = reduction.request(layer)
            attention = self.attn(
                self.ln_1(x),
                reduction.attention_bias(layer, state),
                is_causal=is_causal,
                return_keys=wanted.keys,
                return_weights=wanted.weights,
            )
            x = x + self.ls_1(attention.out)
            x, state = reduction(layer, x, attention, state)
        x = x + self.ls_2(self.mlp(self.ln_2(x)))
        return x, state


class Transformer(nn.Module):
    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        activation: str,
        ls_init_value: float | None = None,
    ) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, activation, ls_init_value) for _ in range(layers)
        )

    def iterate(
        self,
        x: torch.Tensor,
        *,
        is_causal: bool = False,
        reduction: TokenReduction | None = None,
        first_token_out: bool = False,
        prompts: PromptTokens | None = None,
    ) -> Iterator[tuple[int, torch.Tensor, TokenState | None]]:
        """Run the blocks one by one, yielding ``(index, tokens, state)`` after each.

        Callers that need intermediate tokens or want to stop early (early exit) consume this
        generator; ``forward`` simply runs it to the end. ``first_token_out``: the caller reads only the
        first token of the output (class-token pooling), so the last block computes only that token.
        ``prompts`` (``clipforge.layers.prompts``) may replace tokens before each block.
        """
        state = reduction.start(x) if reduction is not None else None
        last = len(self.resblocks) - 1
        for index, block in enumerate(self.resblocks):
            only_first = first_token_out and index == last
            if prompts is not None:
                x = prompts.before_block(index, x)
            if self.grad_checkpointing and reduction is None and torch.is_grad_enabled():
                x, _ = checkpoint(block, x, is_causal=is_causal, first_token_only=only_first, use_reentrant=False)
            else:
                x, state = block(
                    x, is_causal=is_causal, reduction=reduction, layer=index, state=state, first_token_only=only_first
                )
            yield index, x, state

    def forward(
        self,
        x: torch.Tensor,
        *,
        is_causal: bool = False,
        reduction: TokenReduction | None = None,
        first_token_out: bool = False,
        prompts: PromptTokens | None = None,
    ) -> tuple[torch.Tensor, TokenState | None]:
        state = None
        for _, x, state in self.iterate(
            x, is_causal=is_causal, reduction=reduction, first_token_out=first_token_out, prompts=prompts
        ):
            pass
        return x, state
