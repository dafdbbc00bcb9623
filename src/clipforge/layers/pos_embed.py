"""Position embeddings: fixed 2-D sine-cosine tables, and interpolation for running a ViT at another resolution."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_2d_pos_embed(width: int, grid_size: int) -> torch.Tensor:
    """The fixed 2-D sine-cosine table [1 + grid², width] (MAE, He et al. 2022; open_clip ``sin_cos_2d``).

    The first half of the channels encodes the column, the second half the row, each as ``[sin(p·ω), cos(p·ω)]`` with
    ``ω_k = 10000^(-k / (width/4))``; the class token's row is zero. Beyer et al., "Better plain ViT
    baselines for ImageNet-1k" (2022), find it trains faster than a learned table on little data.
    """
    if width % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64), torch.arange(grid_size, dtype=torch.float64), indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), table]).float()


def resize_pos_embed(pos_embed: torch.Tensor, grid_size: int, prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubically resample the patch grid of ``pos_embed`` [prefix + g*g, D] to ``grid_size``² (antialiased)."""
    prefix, grid = pos_embed[:prefix_tokens], pos_embed[prefix_tokens:]
    old = int(math.isqrt(grid.shape[0]))
    if old * old != grid.shape[0]:
        raise ValueError(f"position embedding of {grid.shape[0]} patch tokens is not a square grid")
    if old == grid_size:
        return pos_embed
    image = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    dtype = image.dtype
    image = F.interpolate(image.float(), size=(grid_size, grid_size), mode="bicubic", antialias=True, align_corners=False)
    grid = image.permute(0, 2, 3, 1).reshape(grid_size * grid_size, -1).to(dtype)
    return torch.cat([prefix, grid], dim=0)
