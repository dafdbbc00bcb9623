"""Zero-shot classification tasks over the synthetic world, in the CLIP_benchmark shape: class names,
prompt templates (``template.format(c=classname)``) and a labelling rule on sample metadata.

Prompts reuse the training captions' wording. Captions always name a color and a shape, so the
shape task ensembles its prompt over the eight colors ("a photo of a red {c}.", ...) and the color
task over the shapes, as CLIP's prompt ensembling does (Radford et al. 2021, §3.1.4). Counting
follows CLIP_benchmark's CLEVR-count prompts ("a photo of {c}." with "two objects").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from clipforge.data.synthetic.concepts import (
    ALL_SHAPES,
    COLORS,
    COUNT_WORDS,
    OBJECT_RADIUS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    object_noun,
)

Metadata = Mapping[str, Any]


@dataclass(frozen=True)
class ZeroShotTask:
    """A zero-shot classification task; ``label_of`` is None for samples the task cannot label
    (a concept outside its classes, or a second object that makes the answer ambiguous)."""

    name: str
    classnames: list[str]
    templates: list[str]
    label_of: Callable[[Metadata], int | None]


def _attribute_label(metadata: Metadata, attribute: str, classes: tuple[str, ...]) -> int | None:
    """Index of the first object's attribute; None if the second object differs in it or it is not a class."""
    value = metadata[attribute]
    second = metadata[f"second_{attribute}"]
    if (second is not None and second != value) or value not in classes:
        return None
    return classes.index(value)


def _shape_color_label(metadata: Metadata) -> int | None:
    if metadata["second_shape"] is not None or metadata["shape"] not in SHAPES:
        return None
    return SHAPES.index(metadata["shape"]) * len(COLORS) + list(COLORS).index(metadata["color"])


def _count_label(metadata: Metadata) -> int | None:
    return None if metadata["second_shape"] is not None else metadata["count"] - 1


def _position_label(metadata: Metadata) -> int | None:
    if metadata["second_shape"] is not None or metadata["count"] != 1:
        return None
    return list(POSITIONS).index(metadata["position"])


CONTEXT_FACTORS: dict[str, dict[str, list[str]]] = {
    "size": {size: [size] for size in OBJECT_RADIUS},
    "position": {"anywhere": [""], **{place: [phrase] for place, phrase in POSITION_PHRASES.items()}},
}
"""PerceptionCLIP's contextual factors for this world, in its captions' words ("small", "on the left")."""

PHOTO_TEMPLATES = ["a photo of {c}.", "a picture of {c}.", "an image of {c}."]


def build_tasks() -> dict[str, ZeroShotTask]:
    """shape (8-way), shape_all (the 12 shapes, for OOD and few-shot work), color (8), shape_color (64),
    count (3) and position (5)."""
    colors = list(COLORS)
    color_of_shape = dict(zip(SHAPES, colors, strict=True))
    return {
        "shape": ZeroShotTask(
            "shape",
            list(SHAPES),
            [f"a photo of a {color} {{c}}." for color in colors],
            partial(_attribute_label, attribute="shape", classes=SHAPES),
        ),
        "shape_all": ZeroShotTask(
            "shape_all",
            list(ALL_SHAPES),
            [f"a photo of a {color} {{c}}." for color in colors],
            partial(_attribute_label, attribute="shape", classes=ALL_SHAPES),
        ),
        "color": ZeroShotTask(
            "color",
            colors,
            [f"a photo of a {{c}} {shape}." for shape in SHAPES],
            partial(_attribute_label, attribute="color", classes=tuple(colors)),
        ),
        "shape_color": ZeroShotTask(
            "shape_color",
            [f"{color} {shape}" for shape in SHAPES for color in colors],
            [template.replace("{c}", "a {c}") for template in PHOTO_TEMPLATES] + ["a {c}."],
            _shape_color_label,
        ),
        "count": ZeroShotTask("count", [object_noun(n) for n in COUNT_WORDS], PHOTO_TEMPLATES, _count_label),
        "position": ZeroShotTask(
            "position",
            list(POSITIONS),
            [f"a photo of a {color} {shape} at the {{c}}." for shape, color in color_of_shape.items()],
            _position_label,
        ),
    }
