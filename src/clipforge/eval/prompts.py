"""Class names and prompt templates for zero-shot classification, from files.

Class names: one per line in a ``.txt``, or a JSON list. Templates: ``str.format`` strings with a ``{c}``
placeholder, as in CLIP_benchmark (one per line in a ``.txt``, or a JSON list), or a CuPL JSON object
``{class name: [descriptions]}`` (Pratt et al., "What does a platypus look like?", ICCV 2023). Every
problem is one ``InputError`` line naming the file and the line or entry at fault.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipforge.errors import InputError, one_line

DEFAULT_TEMPLATES = ["a photo of a {c}."]
"""CLIP's default prompt when a dataset comes without templates."""

Templates = list[str] | dict[str, list[str]]


def _read_entries(path: Path, what: str) -> tuple[list[Any] | dict[str, Any], str]:
    """A ``.json`` file's list or object, or a text file's lines (trailing blank lines dropped), and
    what to call one entry in messages ("entry" or "line")."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{what} file {path}: cannot read it ({one_line(error)})") from None
    if path.suffix.lower() != ".json":
        return text.rstrip("\n\r ").splitlines(), "line"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{what} file {path}: invalid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(value, list | dict):
        raise InputError(f"{what} file {path}: expected a JSON list or object, got {type(value).__name__}")
    return value, "entry"


def _nonempty_strings(values: Sequence[Any], where: str, position: str, noun: str) -> list[str]:
    for number, value in enumerate(values, start=1):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{where}: {position} {number} is an empty {noun} ({value!r})")
    if not values:
        raise InputError(f"{where}: has no {noun}s")
    return [value.strip() for value in values]


def read_classnames(path: str | Path) -> list[str]:
    """Class names from a ``.txt`` (one per line) or a JSON list; empty or repeated names are errors."""
    path = Path(path)
    entries, position = _read_entries(path, "class names")
    if isinstance(entries, dict):
        raise InputError(f"class names file {path}: expected a list of class names, got a JSON object")
    names = _nonempty_strings(entries, f"class names file {path}", position, "class name")
    for number, name in enumerate(names, start=1):
        if (first := names.index(name) + 1) != number:
            raise InputError(f"class names file {path}: {position} {number} repeats class {name!r} ({position} {first})")
    return names


def read_templates(path: str | Path) -> Templates:
    """Prompt templates (``.txt`` lines or a JSON list, each with ``{c}``) or CuPL descriptions per class."""
    path = Path(path)
    entries, position = _read_entries(path, "templates")
    where = f"templates file {path}"
    if isinstance(entries, dict):
        return {
            name: _nonempty_strings(texts if isinstance(texts, list) else [], f"{where}, class {name!r}", "entry", "description")
            for name, texts in entries.items()
        }
    templates = _nonempty_strings(entries, where, position, "template")
    for number, template in enumerate(templates, start=1):
        if "{c}" not in template:
            raise InputError(f"{where}: {position} {number} has no {{c}} placeholder ({template!r})")
    return templates


def check_templates(templates: Templates, classnames: Sequence[str], source: str) -> Templates:
    """CuPL descriptions must cover every class; returns them restricted to ``classnames``."""
    if isinstance(templates, list):
        return templates
    missing = [name for name in classnames if name not in templates]
    if missing:
        raise InputError(f"{source}: no descriptions for class {missing[0]!r} ({len(missing)} classes missing)")
    return {name: templates[name] for name in classnames}
