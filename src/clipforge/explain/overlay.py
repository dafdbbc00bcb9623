"""Heat-map overlays: a [0, 1] map drawn in a matplotlib colormap over the image, with a legend strip (what
was explained, the colour scale), saved as PNG, JPEG or WebP by the file's suffix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

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


FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def with_legend(overlay: Image.Image, label: str, colormap: str = "jet") -> Image.Image:
    """``overlay`` above a white strip holding ``label`` and the colour scale from low to high attribution."""
    strip, bar_width = 38, min(160, overlay.width // 2)
    canvas = Image.new("RGB", (overlay.width, overlay.height + strip), "white")
    canvas.paste(overlay, (0, 0))
    draw = ImageDraw.Draw(canvas)
    while len(label) > 1 and draw.textlength(label, font_size=10) > overlay.width - 8:
        label = label[:-2] + "…"
    draw.text((4, overlay.height + 3), label, fill="black", font_size=10)
    gradient = (np.asarray(colormaps[colormap](np.linspace(0, 1, bar_width)))[:, :3] * 255).astype(np.uint8)
    bar = Image.fromarray(np.repeat(gradient[None], 8, axis=0), "RGB")
    left = overlay.width - bar_width - 34
    canvas.paste(bar, (left, overlay.height + 24))
    draw.text((left - 24, overlay.height + 21), "low", fill="black")
    draw.text((left + bar_width + 4, overlay.height + 21), "high", fill="black")
    return canvas


def save_overlay(
    image: Image.Image, heatmap: torch.Tensor | np.ndarray, path: str | Path, alpha: float = 0.5, label: str | None = None
) -> Path:
    """Write ``heatmap_overlay(image, heatmap)`` (with a legend strip when ``label`` is given) atomically, in the
    format of the suffix: .png, .jpg/.jpeg or .webp."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise InputError(f"{path}: unknown image suffix {path.suffix!r}; use one of {', '.join(FORMATS)}")
    overlay = heatmap_overlay(image, heatmap, alpha=alpha)
    if label is not None:
        overlay = with_legend(overlay, label)
    with atomic_path(path) as tmp:
        overlay.save(tmp, format=FORMATS[path.suffix.lower()])
    return path
