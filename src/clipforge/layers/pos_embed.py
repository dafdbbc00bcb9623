"""Position-embedding interpolation for running a ViT at another resolution (open_clip ``resize_pos_embed``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
