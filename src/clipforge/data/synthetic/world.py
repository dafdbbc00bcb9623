"""The synthetic world itself: sample i of a split is a pure function of (config, split, i).

Every random draw comes from ``numpy.random.default_rng(SeedSequence([seed, crc32(split), i, stream]))``,
so the world streams forever, shards across ranks and workers by index, and two processes never disagree.
Scenes are drawn by ``scene``, rendered by ``render`` and captioned by ``captions``; ``tasks`` labels them.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from clipforge.data.synthetic.captions import caption
from clipforge.data.synthetic.concepts import (
    BACKGROUNDS,
    COLORS,
    COUNT_WORDS,
    FILLS,
    OBJECT_RADIUS,
    POSITIONS,
    RELATIONS,
    RESERVED_SHAPES,
    SHAPES,
    SHIFT_BACKGROUNDS,
)
from clipforge.data.synthetic.config import (
    SHIFTS,
    SPLITS,
    Shift,
    WorldConfig,
    resolve_shift,
)
from clipforge.data.synthetic.render import CORRUPTIONS, pixel_box, render
from clipforge.data.synthetic.scene import (
    ConceptTable,
    Scene,
    draw_scene,
    uniform_colors_table,
)
from clipforge.data.synthetic.tasks import ZeroShotTask, build_tasks
from clipforge.errors import ConfigError, InputError

# Independent random streams of one sample: the scene then its pixel noise, and extra retrieval captions.
SCENE_STREAM, CAPTION_STREAM = 0, 1

# The config field that leaves a targeted split empty when it names nothing.
_TARGET_FIELDS = {"test_heldout": "heldout_combos", "test_ood": "heldout_shapes", "test_fewshot": "few_shot_shapes"}


@dataclass(frozen=True)
class Sample:
    """One image-caption pair and what it shows (see ``SyntheticWorld.describe`` for the metadata keys)."""

    image: Image.Image
    caption: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class RetrievalSet:
    """Images, several captions per image (the first is the sample's own) and each image's metadata."""

    images: list[Image.Image]
    captions: list[list[str]]
    metadata: list[dict[str, Any]]


class SyntheticWorld:
    """An endless, deterministic stream of image-caption samples per split (see the module docstring)."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()
        self._split_ids = {split: zlib.crc32(split.encode()) for split in SPLITS}
        self._tables = self._concept_tables()
        self._few_shot = self._place_few_shot()

    def _concept_tables(self) -> dict[str, ConceptTable]:
        """Which first objects each split shows: Zipf-skewed in train, balanced elsewhere."""
        config = self.config
        colors = list(COLORS)

        def zipf(rank: int) -> float:
            return 1.0 / (rank + 1) ** config.zipf_exponent

        in_distribution = [
            (shape, color)
            for shape in config.train_shapes
            for color in colors
            if (shape, color) not in config.heldout_combos
        ]
        shape_rank = {shape: rank for rank, shape in enumerate(config.train_shapes)}
        return {
            "train": ConceptTable({(s, c): zipf(shape_rank[s]) * zipf(colors.index(c)) for s, c in in_distribution}),
            "val": ConceptTable(dict.fromkeys(in_distribution, 1.0)),
            "test": ConceptTable(dict.fromkeys(in_distribution, 1.0)),
            "test_heldout": ConceptTable(dict.fromkeys(config.heldout_combos, 1.0)),
            "test_ood": uniform_colors_table(config.heldout_shapes),
            "test_fewshot": uniform_colors_table(config.few_shot_shapes),
        }

    def _place_few_shot(self) -> dict[int, str]:
        """Train index → few-shot shape, for exactly ``few_shot_k`` indices per shape in ``few_shot_window``."""
        config = self.config
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, zlib.crc32(b"few_shot")]))
        shapes = [shape for shape in config.few_shot_shapes for _ in range(config.few_shot_k)]
        positions = rng.choice(config.few_shot_window, size=len(shapes), replace=False).tolist()
        return dict(zip(positions, shapes, strict=True))

    def few_shot_indices(self) -> dict[str, list[int]]:
        """The train indices that show each few-shot shape (the only ones in the whole train stream)."""
        indices: dict[str, list[int]] = {shape: [] for shape in self.config.few_shot_shapes}
        for index, shape in sorted(self._few_shot.items()):
            indices[shape].append(index)
        return indices

    def _stream(self, split: str, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.config.seed, self._split_ids[split], index, stream]))

    def _source(self, split: str, index: int) -> tuple[int, np.random.Generator]:
        """The index whose scene this one shows (itself, or an earlier one it duplicates) and its scene stream."""
        rate = self.config.duplicate_rate if split == "train" else 0.0
        while True:
            rng = self._stream(split, index, SCENE_STREAM)
            if rate == 0 or index == 0 or index in self._few_shot or rng.random() >= rate:
                return index, rng
            earlier = int(rng.integers(index))
            if earlier in self._few_shot:
                return index, rng
            index = earlier

    def _scene(self, split: str, index: int) -> tuple[Scene, int, np.random.Generator]:
        """The scene, the index it comes from (≠ index for a duplicate) and the stream, left ready for rendering."""
        if split not in SPLITS:
            raise ConfigError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
        if not isinstance(index, int | np.integer) or index < 0:
            raise InputError(f"index: {index!r} is not a non-negative integer")
        table = self._tables[split]
        if not table.pairs:
            raise ConfigError(f"split {split!r} is empty: WorldConfig.{_TARGET_FIELDS[split]} names nothing")
        source, rng = self._source(split, int(index))
        few_shot_shape = self._few_shot.get(source) if split == "train" else None
        if few_shot_shape is not None:
            pair = (few_shot_shape, list(COLORS)[int(rng.integers(len(COLORS)))])
            return draw_scene(pair, rng, self.config, None, None), source, rng
        context = self._tables["train" if split == "train" else "val"]
        noise_table = context if split == "train" else None
        return draw_scene(table.draw(rng), rng, self.config, context, noise_table), source, rng

    def _metadata(self, split: str, index: int, source: int, scene: Scene, shift: Shift) -> dict[str, Any]:
        config, description = self.config, scene.description
        primary, second = description.primary, description.second
        size = config.image_size
        return {
            "split": split,
            "index": index,
            "shape": primary.shape,
            "color": primary.color,
            "size": primary.size,
            "count": description.count,
            "position": description.position,
            "relation": description.relation,
            "second_shape": second.shape if second else None,
            "second_color": second.color if second else None,
            "second_size": second.size if second else None,
            "background": scene.background.kind if shift.background == "default" else shift.background,
            "fill": shift.fill,
            "corruption": shift.corruption,
            "severity": shift.severity if shift.corruption != "none" else 0,
            "boxes": [list(pixel_box(p, size)) for p in scene.placements[: description.count]],
            "second_box": list(pixel_box(scene.placements[-1], size)) if second else None,
            "heldout_combo": (primary.shape, primary.color) in config.heldout_combos,
            "ood_shape": primary.shape in config.heldout_shapes,
            "few_shot": primary.shape in config.few_shot_shapes,
            "caption_noisy": scene.caption_noisy,
            "duplicate_of": source if source != index else None,
        }

    def _shift(self, split: str, shift: str | Shift | None) -> Shift:
        return self.config.shift_for(split) if shift is None else resolve_shift(shift)

    def describe(self, split: str, index: int, shift: str | Shift | None = None) -> tuple[str, dict[str, Any]]:
        """Caption and metadata of sample ``index`` without drawing it (fast: for indexes and filters).

        Metadata: split, index; the first object's shape, color, size ("small"/"large"), count (1–3) and
        position (for a lone object or a related pair); relation and second_shape/_color/_size (or None);
        background, fill, corruption, severity (0 = none); boxes (pixel [x0, y0, x1, y1] of each copy of
        the first object) and second_box; flags heldout_combo, ood_shape, few_shot, caption_noisy; and
        duplicate_of (the earlier train index this sample repeats, or None). ``shift`` overrides the
        split's shift from ``WorldConfig.split_shifts``.
        """
        scene, source, _ = self._scene(split, index)
        return scene.caption, self._metadata(split, int(index), source, scene, self._shift(split, shift))

    def sample(self, split: str, index: int, shift: str | Shift | None = None) -> Sample:
        """Sample ``index`` of ``split``: the same (config, split, index) always gives the same pixels and caption."""
        return self._draw(split, index, shift)[0]

    def _draw(self, split: str, index: int, shift: str | Shift | None) -> tuple[Sample, Scene, int]:
        scene, source, rng = self._scene(split, index)
        active = self._shift(split, shift)
        background = scene.background
        if active.background != "default":
            background = replace(background, kind=active.background)
        config = self.config
        image = render(
            scene.placements,
            background,
            active.fill,
            active.corruption,
            active.severity,
            config.image_size,
            config.supersample,
            rng,
        )
        return Sample(image, scene.caption, self._metadata(split, int(index), source, scene, active)), scene, source

    def samples(
        self, split: str, start: int = 0, stop: int | None = None, shift: str | Shift | None = None
    ) -> Iterator[Sample]:
        """Samples ``start, start + 1, …`` up to ``stop`` (forever if None)."""
        indices = itertools.count(start) if stop is None else range(start, stop)
        for index in indices:
            yield self.sample(split, index, shift)

    def tasks(self) -> dict[str, ZeroShotTask]:
        """Zero-shot tasks: shape (8), shape_all (12), color (8), shape_color (64), count (3), position (5)."""
        return build_tasks()

    def retrieval_set(
        self, split: str, n: int, captions_per_image: int = 5, shift: str | Shift | None = None
    ) -> RetrievalSet:
        """The first ``n`` samples of ``split`` with up to ``captions_per_image`` distinct paraphrases each."""
        if n < 1 or captions_per_image < 1:
            raise InputError(f"retrieval_set: n={n} and captions_per_image={captions_per_image} must be ≥ 1")
        images, captions, metadata = [], [], []
        for index in range(n):
            sample, scene, source = self._draw(split, index, shift)
            images.append(sample.image)
            captions.append(self._paraphrases(split, source, scene, captions_per_image))
            metadata.append(sample.metadata)
        return RetrievalSet(images, captions, metadata)

    def paraphrases(self, split: str, index: int, count: int) -> list[str]:
        """Up to ``count`` distinct captions of sample ``index`` (the first is its own), drawn from the sample's
        caption stream: the same ones ``retrieval_set`` gives, without rendering the image."""
        if count < 1:
            raise InputError(f"paraphrases: count={count} must be ≥ 1")
        scene, source, _ = self._scene(split, index)
        return self._paraphrases(split, source, scene, count)

    def _paraphrases(self, split: str, source: int, scene: Scene, count: int) -> list[str]:
        rng = self._stream(split, source, CAPTION_STREAM)
        found = [scene.caption]
        for _ in range(20 * count):
            if len(found) == count:
                break
            if (text := caption(scene.description, rng)) not in found:
                found.append(text)
        return found

    def concept_vocabulary(self) -> dict[str, list[str]]:
        """Every name the world uses, and which concepts this config holds out or makes few-shot."""
        config = self.config
        return {
            "shapes": list(SHAPES),
            "reserved_shapes": list(RESERVED_SHAPES),
            "colors": list(COLORS),
            "sizes": list(OBJECT_RADIUS),
            "counts": list(COUNT_WORDS.values()),
            "positions": list(POSITIONS),
            "relations": list(RELATIONS),
            "backgrounds": list(BACKGROUNDS + SHIFT_BACKGROUNDS),
            "fills": list(FILLS),
            "corruptions": list(CORRUPTIONS),
            "shifts": list(SHIFTS),
            "splits": list(SPLITS),
            "train_shapes": list(config.train_shapes),
            "heldout_shapes": list(config.heldout_shapes),
            "few_shot_shapes": list(config.few_shot_shapes),
            "heldout_combos": [f"{color} {shape}" for shape, color in config.heldout_combos],
        }
