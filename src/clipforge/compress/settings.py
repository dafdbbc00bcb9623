"""Compression settings read as their parameters' types: the one parser behind ``--set``, ``--compress``,
``--variant`` and the compression records checkpoints hold.

A value arrives as JSON (``--set r=[8,4]`` is a list, ``--set fuse_token=false`` a boolean) or as text
(``--set fuse_token=False``: anything that is not JSON), and is read as the type its parameter is annotated
with: a boolean is true/false/1/0 in any case and nothing else; an int an int; a number any finite int or
float; a list of ints or numbers a list, a comma-separated text (``1,2,3``) or a single value; a union the
first of its types that fits. A value that fits none is a one-line ``ConfigError`` naming the setting, the
value and the expected type.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from clipforge.errors import ConfigError

BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
EXPECTED = {bool: "true or false (or 1, 0)", int: "an int", float: "a number", str: "a string", type(None): "null"}
EXPECTED_LISTS = {int: "a list of ints (e.g. 3,6,9)", float: "a list of numbers (e.g. 0.9,0.8)"}


def typed_settings(method: str, function: Callable[..., Any], names: Sequence[str], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings ``names`` (keyword parameters of ``function``): those given in ``settings`` read as their
    annotated types (``typed_setting``), the others at their defaults; an unknown name is refused."""
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ConfigError(f"unknown {method} setting {unknown[0]!r}; expected one of {list(names)}")
    defaults = inspect.signature(function).parameters
    kinds = typing.get_type_hints(function)
    return {
        name: typed_setting(f"{method} setting {name!r}", settings[name], kinds[name]) if name in settings else defaults[name].default
        for name in names
    }


def typed_setting(name: str, value: Any, kind: Any) -> Any:
    """``value`` read as ``kind`` (bool, int, float, str, None, ``Sequence[int | float]`` or a union of them);
    ``ConfigError`` naming the setting ``name`` when it fits none."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    for option in options:
        try:
            return _read(option, value)
        except (TypeError, ValueError):
            continue
    raise ConfigError(f"{name} must be {' or '.join(map(_expected, options))}, got {value!r}")


def _read(kind: Any, value: Any) -> Any:
    if typing.get_origin(kind) is Sequence:
        (item,) = typing.get_args(kind)
        values = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
        return [_read(item, entry) for entry in values]
    if kind is bool and isinstance(value, (bool, int, str)) and str(value).strip().lower() in BOOLEANS:
        return BOOLEANS[str(value).strip().lower()]
    if kind is int and isinstance(value, (int, str)) and not isinstance(value, bool):
        return int(value)
    if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        number = float(value) if isinstance(value, str) else value
        if math.isfinite(number):
            return number
    if (kind is str and isinstance(value, str)) or (kind is type(None) and value is None):
        return value
    raise TypeError(f"{value!r} is not {_expected(kind)}")


def _expected(kind: Any) -> str:
    if typing.get_origin(kind) is Sequence:
        return EXPECTED_LISTS[typing.get_args(kind)[0]]
    return EXPECTED[kind]
