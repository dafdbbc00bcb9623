"""The knobs of the synthetic world (``WorldConfig``) and its distribution shifts (``Shift``).

Defaults are the learnable world of issue #3: uniform concepts, a second object in 25% of the
scenes, four held-out shape+color pairs, two out-of-distribution shapes, two few-shot shapes seen
five times each in train, no caption noise and no duplicates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from clipforge.data.synthetic.concepts import (
    ALL_SHAPES,
    BACKGROUNDS,
    COLORS,
    FILLS,
    SHAPES,
    SHIFT_BACKGROUNDS,
)
from clipforge.data.synthetic.render import CORRUPTIONS
from clipforge.errors import ConfigError

SPLITS: tuple[str, ...] = ("train", "val", "test", "test_heldout", "test_ood", "test_fewshot")
"""train, val and test share the in-distribution concepts (train with the curation knobs, val and test
balanced and clean); test_heldout shows only held-out shape+color pairs, test_ood only held-out shapes,
test_fewshot only few-shot shapes."""


@dataclass(frozen=True)
class Shift:
    """How a split is rendered differently from the training images; the scenes themselves stay the same.

    Corruptions use the ImageNet-C parameters of Hendrycks & Dietterich, "Benchmarking Neural Network
    Robustness to Common Corruptions and Perturbations" (ICLR 2019), severity 1 (mild) to 5 (strong).
    """

    fill: str = "solid"
    background: str = "default"
    corruption: str = "none"
    severity: int = 3

    def __post_init__(self) -> None:
        if self.fill not in FILLS:
            raise ConfigError(f"Shift.fill: {self.fill!r} is not one of {', '.join(FILLS)}")
        backgrounds = ("default", *BACKGROUNDS, *SHIFT_BACKGROUNDS)
        if self.background not in backgrounds:
            raise ConfigError(f"Shift.background: {self.background!r} is not one of {', '.join(backgrounds)}")
        if self.corruption != "none" and self.corruption not in CORRUPTIONS:
            raise ConfigError(f"Shift.corruption: {self.corruption!r} is not 'none' or one of {', '.join(CORRUPTIONS)}")
        if not 1 <= self.severity <= 5:
            raise ConfigError(f"Shift.severity: {self.severity} is not between 1 and 5")


SHIFTS: dict[str, Shift] = {
    "none": Shift(),
    **{fill: Shift(fill=fill) for fill in FILLS if fill != "solid"},
    **{f"{kind}_background": Shift(background=kind) for kind in SHIFT_BACKGROUNDS},
    **{corruption: Shift(corruption=corruption) for corruption in CORRUPTIONS},
}
"""Named shifts: textured or outline-only objects, unseen backgrounds, corruptions at severity 3."""


def resolve_shift(shift: str | Shift) -> Shift:
    """A ``Shift`` from itself or from its name in ``SHIFTS``."""
    if isinstance(shift, Shift):
        return shift
    if shift not in SHIFTS:
        raise ConfigError(f"shift: {shift!r} is not one of {', '.join(SHIFTS)}")
    return SHIFTS[shift]


def _as_tuple(value: object) -> object:
    """Lists (e.g. from JSON) become tuples, recursively, so a config stays hashable."""
    if isinstance(value, Mapping):
        return tuple(sorted((key, _as_tuple(item)) for key, item in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(item) for item in value)
    return value


@dataclass(frozen=True)
class WorldConfig:
    """Everything that decides the synthetic world; sample i of a split depends on nothing else.

    Curation knobs (Zipf skew, caption noise, duplicates) and held-out concepts act on the train split;
    val and test are balanced and clean. Few-shot shapes appear exactly ``few_shot_k`` times each among
    the first ``few_shot_window`` train indices and never elsewhere in train. ``split_shifts`` maps a split
    to a name in ``SHIFTS`` (a dict is accepted); ``sample(..., shift=...)`` overrides it per call.
    """

    seed: int = 0
    image_size: int = 64
    supersample: int = 2
    second_object_rate: float = 0.25
    count_weights: tuple[float, float, float] = (0.6, 0.2, 0.2)
    small_rate: float = 0.5
    heldout_combos: tuple[tuple[str, str], ...] = (
        ("circle", "green"),
        ("star", "blue"),
        ("heart", "yellow"),
        ("triangle", "white"),
    )
    heldout_shapes: tuple[str, ...] = ("crescent", "ring")
    few_shot_shapes: tuple[str, ...] = ("arrow", "pentagon")
    few_shot_k: int = 5
    few_shot_window: int = 10_000
    caption_noise_rate: float = 0.0
    duplicate_rate: float = 0.0
    zipf_exponent: float = 0.0
    backgrounds: tuple[str, ...] = BACKGROUNDS
    split_shifts: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for item in fields(self):
            object.__setattr__(self, item.name, _as_tuple(getattr(self, item.name)))
        self._check_numbers()
        self._check_concepts()
        for split, shift in self.split_shifts:
            if split not in SPLITS:
                raise ConfigError(f"WorldConfig.split_shifts: split {split!r} is not one of {', '.join(SPLITS)}")
            resolve_shift(shift)

    def _check_numbers(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"WorldConfig.seed: {self.seed} is negative")
        if self.image_size < 32:
            raise ConfigError(f"WorldConfig.image_size: {self.image_size} is below the minimum of 32 pixels")
        if not 1 <= self.supersample <= 4:
            raise ConfigError(f"WorldConfig.supersample: {self.supersample} is not between 1 and 4")
        for name in ("second_object_rate", "small_rate", "caption_noise_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"WorldConfig.{name}: {getattr(self, name)} is not in [0, 1]")
        if not 0.0 <= self.duplicate_rate <= 0.9:
            raise ConfigError(f"WorldConfig.duplicate_rate: {self.duplicate_rate} is not in [0, 0.9]")
        if self.zipf_exponent < 0:
            raise ConfigError(f"WorldConfig.zipf_exponent: {self.zipf_exponent} is negative")
        if len(self.count_weights) != 3 or min(self.count_weights) < 0 or sum(self.count_weights) <= 0:
            raise ConfigError(f"WorldConfig.count_weights: {self.count_weights} is not 3 non-negative weights")
        if self.few_shot_k < 1:
            raise ConfigError(f"WorldConfig.few_shot_k: {self.few_shot_k} is below 1")
        if self.few_shot_window < self.few_shot_k * len(self.few_shot_shapes):
            raise ConfigError(
                f"WorldConfig.few_shot_window: {self.few_shot_window} cannot hold "
                f"{self.few_shot_k} samples of each of {len(self.few_shot_shapes)} few-shot shapes"
            )

    def _check_concepts(self) -> None:
        for name in ("heldout_shapes", "few_shot_shapes"):
            for shape in getattr(self, name):
                if shape not in ALL_SHAPES:
                    raise ConfigError(f"WorldConfig.{name}: {shape!r} is not one of {', '.join(ALL_SHAPES)}")
        if overlap := set(self.heldout_shapes) & set(self.few_shot_shapes):
            raise ConfigError(f"WorldConfig.few_shot_shapes: {sorted(overlap)} are also held-out shapes")
        if not self.train_shapes:
            raise ConfigError("WorldConfig.heldout_shapes: no in-distribution shape is left for training")
        for combo in self.heldout_combos:
            if len(combo) != 2 or combo[0] not in SHAPES or combo[1] not in COLORS:
                raise ConfigError(f"WorldConfig.heldout_combos: {combo!r} is not a (base shape, color) pair")
        if all((shape, color) in self.heldout_combos for shape in self.train_shapes for color in COLORS):
            raise ConfigError("WorldConfig.heldout_combos: no shape+color pair is left for training")
        for kind in self.backgrounds:
            if kind not in BACKGROUNDS:
                raise ConfigError(f"WorldConfig.backgrounds: {kind!r} is not one of {', '.join(BACKGROUNDS)}")
        if not self.backgrounds:
            raise ConfigError("WorldConfig.backgrounds: is empty")

    @property
    def train_shapes(self) -> tuple[str, ...]:
        """The in-distribution shapes: the base shapes minus held-out and few-shot ones."""
        excluded = set(self.heldout_shapes) | set(self.few_shot_shapes)
        return tuple(shape for shape in SHAPES if shape not in excluded)

    def shift_for(self, split: str) -> Shift:
        """The shift ``split_shifts`` selects for a split (no shift by default)."""
        return resolve_shift(dict(self.split_shifts).get(split, "none"))
