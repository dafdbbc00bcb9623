"""Captions of synthetic scenes: several paraphrase templates that always name the first object's
color and shape ("a small red star on the left", "two blue circles", "a photo of a red circle left
of a blue square"). The zero-shot prompts of ``synthetic_tasks`` use the same phrasings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipforge.data.synthetic.concepts import (
    COUNT_WORDS,
    POSITION_PHRASES,
    RELATION_PHRASES,
    object_noun,
    plural,
)


@dataclass(frozen=True)
class ObjectSpec:
    """What an object is: shape, color and size ("small" or "large")."""

    shape: str
    color: str
    size: str


@dataclass(frozen=True)
class Description:
    """What a scene shows: a group of ``count`` copies of ``primary`` at ``position`` (lone objects only),
    or one ``primary`` in ``relation`` to one ``second`` object."""

    primary: ObjectSpec
    count: int
    position: str | None
    relation: str | None
    second: ObjectSpec | None


LONE_TEMPLATES = (
    "{desc}",
    "a photo of {desc}",
    "a picture of {desc}",
    "an image of {desc}",
    "{desc} {place}",
    "a photo of {desc} {place}",
    "there is {desc} {place}",
    "a photo of {objects}: {desc}",
)
GROUP_TEMPLATES = (
    "{desc}",
    "a photo of {desc}",
    "a picture of {desc}",
    "an image of {desc}",
    "there are {desc}",
    "a photo of {objects}: {desc}",
)
RELATION_TEMPLATES = (
    "{desc} {relation} {second}",
    "a photo of {desc} {relation} {second}",
    "a picture of {desc} {relation} {second}",
    "there is {desc} {relation} {second}",
)


def _choose(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def _noun_phrase(spec: ObjectSpec, count: int, rng: np.random.Generator) -> str:
    """"a red star", "a small red star", "two large blue circles": the size word is said half the time."""
    size = f"{spec.size} " if rng.random() < 0.5 else ""
    if count == 1:
        return f"a {size}{spec.color} {spec.shape}"
    return f"{COUNT_WORDS[count]} {size}{spec.color} {plural(spec.shape)}"


def _place_phrase(position: str, rng: np.random.Generator) -> str:
    """"on the left" / "at the left": the second form is the one the position task prompts with."""
    return POSITION_PHRASES[position] if rng.random() < 0.5 else f"at the {position}"


def caption(description: Description, rng: np.random.Generator) -> str:
    """One paraphrase of the scene, drawn with ``rng``."""
    desc = _noun_phrase(description.primary, description.count, rng)
    if description.second is not None and description.relation is not None:
        return _choose(RELATION_TEMPLATES, rng).format(
            desc=desc,
            relation=_choose(RELATION_PHRASES[description.relation], rng),
            second=_noun_phrase(description.second, 1, rng),
        )
    if description.count > 1:
        template = _choose(GROUP_TEMPLATES, rng)
        return template.format(desc=desc, objects=object_noun(description.count))
    template = _choose(LONE_TEMPLATES, rng)
    place = _place_phrase(description.position, rng) if description.position else ""
    return template.format(desc=desc, place=place, objects=object_noun(1))
