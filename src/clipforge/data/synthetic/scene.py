"""Drawing a scene (what is shown, where, on what, and its caption) from a random stream.

Nothing here renders pixels: ``SyntheticWorld.describe`` reads scenes without drawing them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from clipforge.data.synthetic.captions import Description, ObjectSpec, caption
from clipforge.data.synthetic.concepts import (
    COLORS,
    COUNT_LAYOUTS,
    OBJECT_RADIUS,
    POSITIONS,
    RELATIONS,
)
from clipforge.data.synthetic.config import WorldConfig
from clipforge.data.synthetic.render import BackgroundSpec, Placement

Pair = tuple[str, str]

# Largest random offset of an object's centre, as a fraction of the image side: wide for a lone object,
# narrow for groups and pairs so that copies never touch (see COUNT_LAYOUTS).
LONE_JITTER = 0.04
GROUP_JITTER = 0.02
PAIR_JITTER = 0.03


class ConceptTable:
    """A categorical distribution over (shape, color) pairs."""

    def __init__(self, weights: dict[Pair, float]) -> None:
        self.pairs = tuple(pair for pair, weight in weights.items() if weight > 0)
        cumulative = np.cumsum([weights[pair] for pair in self.pairs])
        self.cumulative = cumulative / cumulative[-1] if self.pairs else cumulative

    def draw(self, rng: np.random.Generator) -> Pair:
        return self.pairs[int(np.searchsorted(self.cumulative, rng.random(), side="right"))]

    def draw_other(self, rng: np.random.Generator, excluded: Pair) -> Pair | None:
        """A pair other than ``excluded``, or None if the table holds no other."""
        if all(pair == excluded for pair in self.pairs):
            return None
        while (pair := self.draw(rng)) == excluded:
            pass
        return pair


@dataclass(frozen=True)
class Scene:
    """A drawn scene: its description, where each object goes, its background and its caption."""

    description: Description
    placements: tuple[Placement, ...]
    background: BackgroundSpec
    caption: str
    caption_noisy: bool


def _uniform(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _size(rng: np.random.Generator, config: WorldConfig) -> str:
    return "small" if rng.random() < config.small_rate else "large"


def draw_description(
    pair: Pair, rng: np.random.Generator, config: WorldConfig, second_table: ConceptTable | None
) -> Description:
    """Size, count and place of the first object; with ``second_table``, maybe a second object in a relation."""
    primary = ObjectSpec(pair[0], pair[1], _size(rng, config))
    if second_table is not None and rng.random() < config.second_object_rate:
        other = second_table.draw_other(rng, pair)
        if other is not None:
            relation = _uniform(rng, list(RELATIONS))
            second = ObjectSpec(other[0], other[1], _size(rng, config))
            return Description(primary, 1, RELATIONS[relation][0], relation, second)
    weights = np.cumsum(config.count_weights) / sum(config.count_weights)
    count = 1 + int(np.searchsorted(weights, rng.random(), side="right"))
    position = _uniform(rng, list(POSITIONS)) if count == 1 else None
    return Description(primary, count, position, None, None)


def layout(description: Description, rng: np.random.Generator) -> tuple[Placement, ...]:
    """Object centres: the first object's copies first, then the second object."""
    primary, second = description.primary, description.second
    if second is not None and description.relation is not None:
        centers = [POSITIONS[place] for place in RELATIONS[description.relation]]
        specs, jitter = [primary, second], PAIR_JITTER
    elif description.count == 1 and description.position is not None:
        centers, specs, jitter = [POSITIONS[description.position]], [primary], LONE_JITTER
    else:
        arrangements = COUNT_LAYOUTS[description.count]
        centers = list(arrangements[int(rng.integers(len(arrangements)))])
        specs, jitter = [primary] * description.count, GROUP_JITTER
    offsets = rng.uniform(-jitter, jitter, size=(len(centers), 2))
    return tuple(
        Placement(spec.shape, spec.color, (x + dx, y + dy), OBJECT_RADIUS[spec.size])
        for spec, (x, y), (dx, dy) in zip(specs, centers, offsets.tolist(), strict=True)
    )


# Muted background colors: a gray level in [95, 165] tinted by up to ±15 per channel stays ≥ 76 away (RGB
# distance) from every object color, and a noise amplitude of up to 15 keeps it ≥ 50 away.
_BACKGROUND_LOW = np.array([95, -15, -15, -15, 95, -15, -15, -15, 0, 6])
_BACKGROUND_HIGH = np.array([166, 16, 16, 16, 166, 16, 16, 16, 4, 16])


def draw_background(rng: np.random.Generator, config: WorldConfig) -> BackgroundSpec:
    kind = _uniform(rng, config.backgrounds)
    values = rng.integers(_BACKGROUND_LOW, _BACKGROUND_HIGH).tolist()
    color_a = (values[0] + values[1], values[0] + values[2], values[0] + values[3])
    color_b = (values[4] + values[5], values[4] + values[6], values[4] + values[7])
    return BackgroundSpec(kind, color_a, color_b, direction=values[8], noise_amplitude=values[9])


def draw_scene(
    pair: Pair,
    rng: np.random.Generator,
    config: WorldConfig,
    second_table: ConceptTable | None,
    noise_table: ConceptTable | None,
) -> Scene:
    """The whole scene; with ``noise_table``, the caption is replaced at ``caption_noise_rate`` by one
    that names another first object drawn from that table."""
    description = draw_description(pair, rng, config, second_table)
    placements = layout(description, rng)
    background = draw_background(rng, config)
    text = caption(description, rng)
    if noise_table is not None and config.caption_noise_rate > 0 and rng.random() < config.caption_noise_rate:
        wrong = noise_table.draw_other(rng, pair)
        if wrong is not None:
            wrong_primary = replace(description.primary, shape=wrong[0], color=wrong[1])
            wrong_caption = caption(replace(description, primary=wrong_primary), rng)
            return Scene(description, placements, background, wrong_caption, True)
    return Scene(description, placements, background, text, False)


def uniform_colors_table(shapes: tuple[str, ...]) -> ConceptTable:
    """Every color with each of ``shapes``, equally likely."""
    return ConceptTable({(shape, color): 1.0 for shape in shapes for color in COLORS})
