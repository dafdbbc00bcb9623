"""The identity task of the synthetic world (issue #15, re-identification): an identity is one object with a
fixed shape, color, fill and size; its images ("views") show it at different positions on different
backgrounds, some corrupted. Identities are split once, by a seeded shuffle of all 960 combinations
(12 shapes × 8 colors × 5 fills × 2 sizes): the first 600 train, the last 360 are for testing only, so test
identities are never seen in training.

View v of identity k is a pure function of (config seed, k, v). Views 0 and 1 of a test identity are the
queries' and the gallery's first renders; every view is a separate render (own position, background, noise).
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from clipforge.data.synthetic.concepts import ALL_SHAPES, COLORS, FILLS, OBJECT_RADIUS
from clipforge.data.synthetic.config import WorldConfig
from clipforge.data.synthetic.render import CORRUPTIONS, Placement, render
from clipforge.data.synthetic.scene import draw_background
from clipforge.errors import InputError

TRAIN_IDENTITIES = 600
CORRUPTION_RATE = 0.3  # views with one corruption at severity 1–2


@dataclass(frozen=True)
class Identity:
    shape: str
    color: str
    fill: str
    size: str

    @property
    def name(self) -> str:
        return f"{self.size} {self.fill} {self.color} {self.shape}"


def identities(config: WorldConfig | None = None) -> dict[str, list[Identity]]:
    """``{"train": [...600], "test": [...360]}``: every combination, shuffled by the world's seed."""
    seed = (config or WorldConfig()).seed
    every = [Identity(*combo) for combo in itertools.product(ALL_SHAPES, COLORS, FILLS, OBJECT_RADIUS)]
    order = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(b"identities")])).permutation(len(every))
    shuffled = [every[i] for i in order]
    return {"train": shuffled[:TRAIN_IDENTITIES], "test": shuffled[TRAIN_IDENTITIES:]}


def identity_view(identity: Identity, view: int, config: WorldConfig | None = None) -> Image.Image:
    """View ``view`` of ``identity``: a random position (the object fully inside), background and maybe corruption."""
    config = config or WorldConfig()
    if view < 0:
        raise InputError(f"view: {view} is negative")
    key = zlib.crc32(identity.name.encode())
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, key, view]))
    radius = OBJECT_RADIUS[identity.size]
    center = tuple(float(value) for value in rng.uniform(radius + 0.02, 1 - radius - 0.02, size=2))
    background = draw_background(rng, config)
    corruption, severity = "none", 0
    if rng.random() < CORRUPTION_RATE:
        corruption, severity = list(CORRUPTIONS)[int(rng.integers(len(CORRUPTIONS)))], int(rng.integers(1, 3))
    placement = Placement(identity.shape, identity.color, center, radius)
    return render((placement,), background, identity.fill, corruption, severity, config.image_size, config.supersample, rng)
