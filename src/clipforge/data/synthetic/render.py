"""Drawing the synthetic world's scenes with PIL at the target size.

Each object is drawn as a coverage mask over its own bounding box, supersampled and box-filtered
down (``Image.reduce``) for antialiased edges, then its color is pasted through the mask. Textured
and outline-only fills are masks too, so a shifted object keeps exactly its color. Corruptions use
the ImageNet-C parameters (Hendrycks & Dietterich, ICLR 2019), blur radii scaled from 224 px to the
image size.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from clipforge.data.synthetic.concepts import COLORS

CORRUPTIONS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "gaussian_blur": (1.0, 2.0, 3.0, 4.0, 6.0),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "jpeg": (25, 18, 15, 10, 7),
}
"""ImageNet-C parameters at severities 1–5: noise σ (on [0, 1]), blur σ at 224 px, pixelate factor,
contrast factor, JPEG quality (``make_imagenet_c.py``)."""


@dataclass(frozen=True)
class Placement:
    """One drawn object: centre and half-side as fractions of the image side."""

    shape: str
    color: str
    center: tuple[float, float]
    radius: float


@dataclass(frozen=True)
class BackgroundSpec:
    """A background: its kind, two muted colors, a gradient direction (0–3) and a noise amplitude."""

    kind: str
    color_a: tuple[int, int, int]
    color_b: tuple[int, int, int]
    direction: int
    noise_amplitude: int


def _regular_polygon(corners: int, inner: float | None = None) -> np.ndarray:
    """Unit-radius polygon pointing up; with ``inner`` a star alternating outer and inner radii."""
    steps = corners * (2 if inner else 1)
    angles = -math.pi / 2 + np.arange(steps) * 2 * math.pi / steps
    radii = np.where(np.arange(steps) % 2, inner, 1.0) if inner else np.ones(steps)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    """The classic parametric heart curve, scaled into the unit square."""
    t = np.linspace(0, 2 * math.pi, 33)[:-1]
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y - (y.max() + y.min()) / 2], axis=1) / 16


def _cross(half_width: float) -> np.ndarray:
    """A plus sign: one arm's outline, turned four times by 90°."""
    arm = np.array([[-half_width, -1.0], [half_width, -1.0], [half_width, -half_width]])
    turns = [np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) for a in np.arange(4) * np.pi / 2]
    return np.concatenate([arm @ turn for turn in turns])


def _points(*xy: float) -> np.ndarray:
    return np.array(xy, dtype=float).reshape(-1, 2)


# A shape is a list of strokes in unit coordinates (the object spans [-1, 1]², y down): a polygon or a
# circle (cx, cy, r), painted with coverage 255 or erased with 0.
SHAPE_STROKES: dict[str, tuple[tuple[str, object, int], ...]] = {
    "circle": (("circle", (0.0, 0.0, 0.95), 255),),
    "square": (("polygon", _points(-0.8, -0.8, 0.8, -0.8, 0.8, 0.8, -0.8, 0.8), 255),),
    "triangle": (("polygon", _points(0.0, -0.95, 1.0, 0.8, -1.0, 0.8), 255),),
    "star": (("polygon", _regular_polygon(5, inner=0.42), 255),),
    "hexagon": (("polygon", _regular_polygon(6), 255),),
    "cross": (("polygon", _cross(0.3), 255),),
    "heart": (("polygon", _heart(), 255),),
    "diamond": (("polygon", _points(0.0, -1.0, 0.65, 0.0, 0.0, 1.0, -0.65, 0.0), 255),),
    "crescent": (("circle", (0.0, 0.0, 0.95), 255), ("circle", (0.4, -0.15, 0.75), 0)),
    "arrow": (("polygon", _points(-1, -0.25, 0.1, -0.25, 0.1, -0.7, 1, 0, 0.1, 0.7, 0.1, 0.25, -1, 0.25), 255),),
    "pentagon": (("polygon", _regular_polygon(5), 255),),
    "ring": (("circle", (0.0, 0.0, 0.95), 255), ("circle", (0.0, 0.0, 0.55), 0)),
}


def pixel_box(placement: Placement, size: int, margin: int = 0) -> tuple[int, int, int, int]:
    """The object's bounding square in pixels (x0, y0, x1, y1), clipped to the image."""
    cx, cy, r = placement.center[0] * size, placement.center[1] * size, placement.radius * size
    return (
        max(0, math.floor(cx - r) - margin),
        max(0, math.floor(cy - r) - margin),
        min(size, math.ceil(cx + r) + margin),
        min(size, math.ceil(cy + r) + margin),
    )


def _coverage_mask(placement: Placement, box: tuple[int, int, int, int], size: int, supersample: int) -> Image.Image:
    x0, y0, x1, y1 = box
    mask = Image.new("L", ((x1 - x0) * supersample, (y1 - y0) * supersample), 0)
    draw = ImageDraw.Draw(mask)
    ox = (placement.center[0] * size - x0) * supersample
    oy = (placement.center[1] * size - y0) * supersample
    scale = placement.radius * size * supersample
    for kind, geometry, value in SHAPE_STROKES[placement.shape]:
        if kind == "polygon":
            draw.polygon((geometry * scale + (ox, oy)).ravel().tolist(), fill=value)
        else:
            cx, cy, r = geometry
            draw.ellipse(
                [ox + (cx - r) * scale, oy + (cy - r) * scale, ox + (cx + r) * scale, oy + (cy + r) * scale], fill=value
            )
    return mask.reduce(supersample) if supersample > 1 else mask


@cache
def _fill_pattern(fill: str, size: int) -> np.ndarray:
    """A 0/1 texture over the whole image, so neighbouring objects' textures line up."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(4, size // 10)
    half = period // 2
    if fill == "stripes":
        pattern = ((xx + yy) // half) % 2 == 0
    elif fill == "checker":
        pattern = (xx // half + yy // half) % 2 == 0
    else:  # dots
        pattern = (xx % period - half + 0.5) ** 2 + (yy % period - half + 0.5) ** 2 <= (period / 3) ** 2
    return pattern.astype(np.uint8)


def _apply_fill(mask: Image.Image, fill: str, box: tuple[int, int, int, int], size: int) -> Image.Image:
    if fill == "solid":
        return mask
    if fill == "outline":
        width = max(1, size // 32)
        return ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(2 * width + 1)))
    x0, y0, x1, y1 = box
    return Image.fromarray(np.asarray(mask) * _fill_pattern(fill, size)[y0:y1, x0:x1])


@cache
def _gradient_mask(direction: int, size: int) -> Image.Image:
    """0→255 ramp: left to right, top to bottom, or along either diagonal."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    ramp = (xx, yy, (xx + yy) / 2, (xx + 1 - yy) / 2)[direction]
    return Image.fromarray(np.round(ramp * 255).astype(np.uint8))


@cache
def _checkerboard_mask(size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size] // max(2, size // 8)
    return Image.fromarray(((xx + yy) % 2 * 255).astype(np.uint8))


def _background(spec: BackgroundSpec, size: int, rng: np.random.Generator) -> Image.Image:
    if spec.kind == "noise":
        amplitude = spec.noise_amplitude
        raw = np.frombuffer(rng.bytes(size * size * 3), dtype=np.uint8).reshape(size, size, 3).astype(np.int16)
        noisy = np.asarray(spec.color_a, dtype=np.int16) + ((raw * (2 * amplitude + 1)) >> 8) - amplitude
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    base = Image.new("RGB", (size, size), spec.color_a)
    if spec.kind == "gradient":
        return Image.composite(Image.new("RGB", (size, size), spec.color_b), base, _gradient_mask(spec.direction, size))
    if spec.kind == "checkerboard":
        return Image.composite(Image.new("RGB", (size, size), spec.color_b), base, _checkerboard_mask(size))
    if spec.kind == "clutter":
        draw = ImageDraw.Draw(base)
        palette = list(COLORS.values())
        for _ in range(12):
            ends = (rng.random(4) * size).tolist()
            draw.line(ends, fill=palette[int(rng.integers(len(palette)))], width=max(1, size // 64))
    return base


def corrupt(image: Image.Image, corruption: str, severity: int, rng: np.random.Generator) -> Image.Image:
    """One ImageNet-C corruption at severity 1–5 (parameters in ``CORRUPTIONS``)."""
    level = CORRUPTIONS[corruption][severity - 1]
    size = image.width
    if corruption == "gaussian_blur":
        return image.filter(ImageFilter.GaussianBlur(radius=level * size / 224))
    if corruption == "pixelate":
        small = max(1, int(size * level))
        return image.resize((small, small), Image.Resampling.BOX).resize((size, size), Image.Resampling.BOX)
    if corruption == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(level))
        return Image.open(buffer).convert("RGB")
    pixels = np.asarray(image, dtype=np.float32) / 255
    if corruption == "gaussian_noise":
        pixels = pixels + rng.normal(0.0, level, pixels.shape)
    else:  # contrast
        means = pixels.mean(axis=(0, 1), keepdims=True)
        pixels = (pixels - means) * level + means
    return Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8))


def render(
    placements: tuple[Placement, ...],
    background: BackgroundSpec,
    fill: str,
    corruption: str,
    severity: int,
    size: int,
    supersample: int,
    rng: np.random.Generator,
) -> Image.Image:
    """The RGB image of a scene; ``rng`` supplies only pixel noise (noisy backgrounds, clutter, noise corruption)."""
    image = _background(background, size, rng)
    for placement in placements:
        box = pixel_box(placement, size, margin=1)
        mask = _apply_fill(_coverage_mask(placement, box, size, supersample), fill, box, size)
        image.paste(COLORS[placement.color], box, mask)
    return image if corruption == "none" else corrupt(image, corruption, severity, rng)
