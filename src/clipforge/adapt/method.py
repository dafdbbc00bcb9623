"""What an adaptation method is to the rest of the package: ``Method`` (how to fit it, how to rebuild its head
from a file), ``Head`` (features → class logits) and ``FitInputs`` (what every fit receives).

A method's settings are a frozen dataclass of its paper's defaults, whose ``RANGES`` class attribute maps a
numeric field to the ``Range`` of values it allows; ``settings_from`` checks ``--set`` values against both.
``clipforge.adapt.registry`` maps each name to its ``Method``; other packages add theirs with ``register``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from clipforge.adapt.features import FeatureCache
from clipforge.adapt.fewshot import FewShotSet
from clipforge.errors import ConfigError

Kind = Literal["training-free", "head", "prompts", "weights"]


class Head(nn.Module):
    """A fitted classifier on top of a model. ``logits`` maps normalised image features [N, D] to [N, C];
    ``image_model`` is the model whose features it reads (the base model, or a prompted copy for MaPLe)."""

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_model(self, model: Any) -> Any:
        return model


@dataclass
class FitInputs:
    """What every ``fit`` receives: the model (left unchanged), the few shots, a feature cache over the model,
    the zero-shot head ``text`` [C, D] of the shots' class names and prompts (normalised rows), and what names
    the model (``model_source``: its path or name, recorded in a tuned checkpoint's provenance)."""

    model: Any
    shots: FewShotSet
    cache: FeatureCache
    text: torch.Tensor
    progress: bool = False
    model_source: str = ""


@dataclass
class Saved:
    """What ``rebuild`` receives: a file's tensors, fitted scalars and settings, the model it is applied to, that
    model's zero-shot head ``text`` [C, D] and the class names."""

    tensors: Mapping[str, torch.Tensor]
    extra: Mapping[str, Any]
    settings: Any
    model: Any
    text: torch.Tensor
    classnames: list[str]


@dataclass
class Fitted:
    """A fitted head: the tensors and fitted scalars a file stores (``extra``), or a new model for weight methods."""

    tensors: dict[str, torch.Tensor]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: Any = None


@dataclass(frozen=True)
class Method:
    """``fit(inputs, settings) -> Fitted``; ``rebuild(saved) -> Head`` makes the head again from a file; ``None``
    for weight methods, whose result is a checkpoint. ``uses_validation``: the fit selects hyper-parameters on
    validation shots."""

    name: str
    kind: Kind
    settings: type
    fit: Callable[[FitInputs, Any], Fitted]
    rebuild: Callable[[Saved], Head] | None
    summary: str
    uses_validation: bool = False


@dataclass(frozen=True)
class Range:
    """The values a numeric setting allows: from ``low`` up to ``high`` (None: no bound), each end included
    unless open."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '≥'} {self.low:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_ONE = Range(1)
AT_LEAST_TWO = Range(2)
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)
BELOW_ONE = Range(0, 1, high_open=True)
"""A dropout rate or a label smoothing: at 1 nothing is left to learn from."""


def settings_from(cls: type, values: Mapping[str, Any], method: str, *, also: Sequence[str] = ()) -> Any:
    """An instance of the settings dataclass ``cls`` with ``values`` checked against its fields' types and its
    ``RANGES``; ``also`` names settings the caller takes itself (listed when a key is unknown)."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    ranges = getattr(cls, "RANGES", {})
    checked = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{method}: unknown setting {key!r} (one of {', '.join([*fields, *also])})")
        checked[key] = _checked(value, fields[key].default, f"{method}.{key}")
        if key in ranges:
            _check_range(checked[key], ranges[key], f"{method}.{key}")
    return cls(**checked)


def _check_range(value: Any, allowed: Range, where: str) -> None:
    items = value if isinstance(value, tuple) else (value,)
    if any(item not in allowed for item in items):
        shown = list(value) if isinstance(value, tuple) else value
        raise ConfigError(f"{where}: {shown!r} is out of range (allowed: {'each ' if isinstance(value, tuple) else ''}{allowed})")


def _checked(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple) or len(value) != len(default):
            raise ConfigError(f"{where}: expected a list of {len(default)} values, got {value!r}")
        return tuple(_checked(item, reference, where) for item, reference in zip(value, default, strict=True))
    if isinstance(default, str) or default is None:
        if not isinstance(value, str) and not (default is None and value is None):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def settings_dict(settings: Any) -> dict[str, Any]:
    """The settings as JSON-ready values (tuples become lists)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(settings).items()}
