"""Heat-map overlays: a [0, 1] map drawn in a matplotlib colormap over the image, saved as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from clipforge._util.fileio import atomic_path
from clipforge.errors import InputError


def heatmap_overlay(
    image: Image.Image, heatmap: torch.Tensor | np.ndarray, *, alpha: float = 0.5, colormap: str = "jet", min_side: int = 224
) -> Image.Image:
    """``image`` blended with the colored ``heatmap`` (any [h, w] grid in [0, 1], resized bilinearly).

    Small images are enlarged (nearest neighbour) so that the shorter side is at least ``min_side``.
    """
    values = np.asarray(heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor) else heatmap, dtype=np.float32)
    if values.ndim != 2 or not np.isfinite(values).all():
        raise InputError(f"heat map: expected a finite 2-D array, got shape {values.shape}")
    if not 0 <= alpha <= 1:
        raise InputError(f"alpha: {alpha} is not in [0, 1]")
    scale = max(1, -(-min_side // min(image.size)))
    base = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    resized = np.asarray(Image.fromarray(values, "F").resize(base.size, Image.Resampling.BILINEAR))
    colored = colormaps[colormap](np.clip(resized, 0, 1))[..., :3]
    blended = (1 - alpha) * np.asarray(base, dtype=np.float32) / 255 + alpha * colored
    return Image.fromarray(np.round(blended * 255).astype(np.uint8), "RGB")


def save_overlay(image: Image.Image, heatmap: torch.Tensor | np.ndarray, path: str | Path, alpha: float = 0.5) -> Path:
    """Write ``heatmap_overlay(image, heatmap)`` as a PNG (atomically)."""
    path = Path(path)
    overlay = heatmap_overlay(image, heatmap, alpha=alpha)
    with atomic_path(path) as tmp:
        overlay.save(tmp, format="PNG")
    return path
