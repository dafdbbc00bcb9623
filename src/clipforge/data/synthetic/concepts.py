"""The vocabulary of the synthetic world: shapes, colors, sizes, places and counts.

Geometry is given as fractions of the image side, so every image size shows the same scenes.
Sizes follow the learnability brief of issue #3: a "large" object spans ~40% of the image,
a "small" one ~22%, so that a 64 px ViT with 8 px patches sees each shape across several patches.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross", "heart", "diamond")
"""The eight in-distribution shapes: every zero-shot shape task is over these."""

RESERVED_SHAPES: tuple[str, ...] = ("crescent", "arrow", "pentagon", "ring")
"""Shapes kept for out-of-distribution and few-shot experiments; never in train unless made few-shot."""

ALL_SHAPES: tuple[str, ...] = SHAPES + RESERVED_SHAPES

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 225),
    "yellow": (240, 215, 30),
    "purple": (160, 40, 190),
    "cyan": (40, 200, 215),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
"""Eight colors at least 100 apart in RGB; none starts with a vowel, so "a <color> <shape>" is always grammatical."""

OBJECT_RADIUS: dict[str, float] = {"small": 0.11, "large": 0.20}
"""Half the side of an object's bounding square, as a fraction of the image side."""

POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}
"""Centre (x, y) of a lone object at each named position; y grows downwards as in image coordinates."""

POSITION_PHRASES: dict[str, str] = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}

RELATIONS: dict[str, tuple[str, str]] = {
    "left of": ("left", "right"),
    "right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
"""Relation of the first object to the second → (position of the first, position of the second)."""

RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}

COUNT_LAYOUTS: dict[int, tuple[tuple[tuple[float, float], ...], ...]] = {
    2: (
        ((0.25, 0.5), (0.75, 0.5)),
        ((0.5, 0.25), (0.5, 0.75)),
        ((0.25, 0.25), (0.75, 0.75)),
        ((0.25, 0.75), (0.75, 0.25)),
    ),
    3: (
        ((0.25, 0.25), (0.75, 0.25), (0.5, 0.75)),
        ((0.25, 0.75), (0.75, 0.75), (0.5, 0.25)),
        ((0.25, 0.25), (0.25, 0.75), (0.75, 0.5)),
        ((0.75, 0.25), (0.75, 0.75), (0.25, 0.5)),
    ),
}
"""Where the copies of a group of two or three go (a lone object goes to one of ``POSITIONS``).

Centres are ≥ 0.5 apart, so even large copies never touch."""

COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "gradient")
"""The default backgrounds, all muted (low saturation, mid brightness) so every object color stands out."""

SHIFT_BACKGROUNDS: tuple[str, ...] = ("checkerboard", "clutter")
"""Backgrounds only a distribution shift uses."""

FILLS: tuple[str, ...] = ("solid", "stripes", "checker", "dots", "outline")


def plural(shape: str) -> str:
    """English plural of a shape name ("cross" → "crosses", "star" → "stars")."""
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


def object_noun(count: int) -> str:
    """"one object", "two objects", … as the count task and the count captions say it."""
    return f"{COUNT_WORDS[count]} object" + ("" if count == 1 else "s")
