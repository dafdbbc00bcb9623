"""Multi-head self-attention through SDPA, with open_clip / ``nn.MultiheadAttention`` parameter names.

The fused ``in_proj_weight`` (rows q; k; v) and ``in_proj_bias`` keep OpenAI and open_clip checkpoints
loadable with no remapping. Unlike ``nn.MultiheadAttention`` the layer can hand back its keys (the
similarity metric of token merging, Bolya et al. 2023) and its attention weights (attention maps,
EViT's class-token attention) without hooks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class AttentionOutput(NamedTuple):
    out: torch.Tensor  # [B, N, D], after the output projection
    keys: torch.Tensor | None  # [B, H, N, Dh], when asked for
    weights: torch.Tensor | None  # [B, H, N, N] post-softmax, when asked for


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """The fused q/k/v projection; quantized and adapted variants override only this."""
        return F.linear(x, self.in_proj_weight, self.in_proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        *,
        is_causal: bool = False,
        return_keys: bool = False,
        return_weights: bool = False,
        first_query_only: bool = False,
    ) -> AttentionOutput:
        """``attn_bias`` is added to the logits (broadcast to [B, H, N, N]); ``is_causal`` masks the future.

        ``first_query_only``: only the first token attends (out [B, 1, D], weights [B, H, 1, N]); every
        token still serves as key and value.
        """
        q, k, v, attn_bias = self.split_heads(x, attn_bias, is_causal=is_causal, first_query_only=first_query_only)
        if return_weights or (x.device.type == "cpu" and x.requires_grad and torch.is_grad_enabled()):
            # Explicit softmax(q kᵀ) v. When training on a CPU this is also the faster path: SDPA's CPU
            # flash-attention backward is several times slower for ViT-length sequences (measured: 36% of a
            # synthetic-tiny training step vs 8% for this path).
            weights = self._weights(q, k, attn_bias, is_causal)
            out = weights @ v
        else:
            weights = None
            if attn_bias is not None:
                attn_bias = attn_bias.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=is_causal)
        return AttentionOutput(self.merge_heads(out), k if return_keys else None, weights if return_weights else None)

    def split_heads(
        self, x: torch.Tensor, attn_bias: torch.Tensor | None, *, is_causal: bool, first_query_only: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q, k, v as [B, H, N, Dh] (q of the first token only, with its rows of ``attn_bias``, when asked)."""
        if first_query_only and is_causal:
            raise ValueError("first_query_only: a causal first token attends only to itself")
        q, k, v = self.project_heads(x)
        if first_query_only:
            q = q[:, :, :1]
            if attn_bias is not None and attn_bias.shape[-2] != 1:
                attn_bias = attn_bias[..., :1, :]
        return q, k, v, attn_bias

    def project_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [B, H, N, Dh] from the fused projection (``project_qkv``)."""
        batch, tokens, _ = x.shape
        qkv = self.project_qkv(x).view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head outputs [B, H, N, Dh] → the output projection of their concatenation [B, N, D]."""
        batch, heads, queries, head_dim = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, queries, heads * head_dim))

    def _weights(
        self, q: torch.Tensor, k: torch.Tensor, attn_bias: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        logits = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        if attn_bias is not None:
            logits = logits + attn_bias
        if is_causal:
            n = logits.shape[-1]
            future = torch.ones(n, n, dtype=torch.bool, device=logits.device).triu_(1)
            logits = logits.masked_fill(future, float("-inf"))
        return logits.softmax(dim=-1)
