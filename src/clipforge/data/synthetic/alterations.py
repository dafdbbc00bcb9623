"""Altered images for detector training (issue #15): real renderings against renderings altered by one of several
families of generator-like artifacts, so that a detector trained on some families can be tested on another, as
deepfake and AI-image detectors are tested on unseen generators.

Families (each drawn with its own strength from the image's stream):

- ``checkerboard``: the periodic pattern of transposed-convolution upsampling (Odena et al., "Deconvolution and
  Checkerboard Artifacts", Distill 2016): the image at half resolution, upsampled by nearest neighbour, times a
  2×2-periodic gain of ±4–8%;
- ``seam``: a blending seam: a rectangle replaced by the same region of another rendering (another scene's
  background and colours) with a hard edge, as face swaps paste a face;
- ``channel_shift``: one colour channel shifted by 1–2 pixels (a misregistration no camera makes);
- ``double_jpeg``: JPEG at quality 60–80, shifted by 1–3 pixels, JPEG again at 85–95 (misaligned double
  compression).

Sample i of ``real_or_altered`` is real when i is even and altered when odd (families in turn), from the
split's i-th rendering: a pure function of (world, split, families, i).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from clipforge.errors import ConfigError


def _checkerboard(image: Image.Image, rng: np.random.Generator, other: Image.Image) -> Image.Image:
    size = image.width
    small = image.resize((size // 2, size // 2), Image.Resampling.BILINEAR).resize((size, size), Image.Resampling.NEAREST)
    gain = rng.uniform(0.04, 0.08)
    yy, xx = np.mgrid[0:size, 0:size]
    pattern = 1 + gain * np.where((xx + yy) % 2 == 0, 1.0, -1.0)[..., None]
    return _image(np.asarray(small, dtype=np.float32) * pattern)


def _seam(image: Image.Image, rng: np.random.Generator, other: Image.Image) -> Image.Image:
    size = image.width
    width, height = (int(value) for value in rng.integers(size // 3, size // 2 + 1, size=2))
    x0, y0 = (int(value) for value in rng.integers(0, size - np.array([width, height]) + 1))
    pixels = np.asarray(image).copy()
    pixels[y0 : y0 + height, x0 : x0 + width] = np.asarray(other)[y0 : y0 + height, x0 : x0 + width]
    return Image.fromarray(pixels)


def _channel_shift(image: Image.Image, rng: np.random.Generator, other: Image.Image) -> Image.Image:
    pixels = np.asarray(image).copy()
    channel, shift, axis = int(rng.integers(3)), int(rng.integers(1, 3)) * int(rng.choice([-1, 1])), int(rng.integers(2))
    pixels[..., channel] = np.roll(pixels[..., channel], shift, axis=axis)
    return Image.fromarray(pixels)


def _double_jpeg(image: Image.Image, rng: np.random.Generator, other: Image.Image) -> Image.Image:
    first = _jpeg(image, int(rng.integers(60, 81)))
    shift = tuple(int(value) for value in rng.integers(1, 4, size=2))
    shifted = Image.fromarray(np.roll(np.asarray(first), shift, axis=(0, 1)))
    return _jpeg(shifted, int(rng.integers(85, 96)))


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(buffer).convert("RGB")


def _image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(pixels, 0, 255)).astype(np.uint8))


ALTERATIONS: dict[str, Callable[[Image.Image, np.random.Generator, Image.Image], Image.Image]] = {
    "checkerboard": _checkerboard,
    "seam": _seam,
    "channel_shift": _channel_shift,
    "double_jpeg": _double_jpeg,
}
"""Family name → ``alter(image, rng, other_rendering)``."""


def check_families(families: Sequence[str], where: str) -> list[str]:
    names = list(families)
    unknown = [name for name in names if name not in ALTERATIONS]
    if not names or unknown:
        raise ConfigError(f"{where}: {', '.join(unknown) or 'no family'} — expected some of {', '.join(ALTERATIONS)}")
    return names


def real_or_altered(world: object, split: str, index: int, families: Sequence[str]) -> tuple[Image.Image, int, str]:
    """(image, label, family): sample ``index`` is real (label 0, family "real") when even, else altered (label 1)
    by ``families[(index // 2) % len(families)]``; ``world`` is a ``SyntheticWorld``."""
    families = check_families(families, "families")
    image = world.sample(split, index).image  # type: ignore[attr-defined]
    if index % 2 == 0:
        return image, 0, "real"
    family = families[(index // 2) % len(families)]
    rng = np.random.default_rng(np.random.SeedSequence([zlib.crc32(family.encode()), zlib.crc32(split.encode()), index]))
    other = world.sample(split, index + 1_000_000).image  # type: ignore[attr-defined]
    return ALTERATIONS[family](image, rng, other), 1, family
