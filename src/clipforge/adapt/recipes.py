"""The task recipes on CLIP features (issue #15), by name: each trains on ``--data`` and returns an object with
its adapter record (``clipforge.adapt.adapter_file``) and ``save(path)``. Each takes the model, the data, the
settings, the seed, whether to show progress, what names the model (recorded by the recipes that tune it) and
the data readers' options.

- ``clipn``: a "no" text encoder for OOD detection (``clipforge.adapt.clipn``);
- ``detector``: a real-vs-altered detector (``clipforge.adapt.detector``);
- ``reid``: image–image contrastive fine-tuning for re-identification (``clipforge.adapt.reid``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clipforge.adapt.adapter import Adapter
from clipforge.adapt.clipn import fit_clipn
from clipforge.adapt.detector import fit_detector
from clipforge.adapt.reid import fit_reid
from clipforge.errors import ConfigError


def _clipn(model: Any, data: str, settings: dict[str, Any], seed: int, progress: bool, model_source: str | None,
           **_: Any) -> Any:
    return fit_clipn(model, data, settings, seed, progress)


def fit_detector_recipe(model: Any, data: str, settings: dict[str, Any], seed: int, progress: bool,
                        model_source: str | None, **options: Any) -> Any:
    return Adapter(fit_detector(model, data, settings, seed, progress, **options), source="detector adapter")


def fit_reid_recipe(model: Any, data: str, settings: dict[str, Any], seed: int, progress: bool,
                    model_source: str | None, **options: Any) -> Any:
    return fit_reid(model, data, settings, seed, progress, model_source, **options)


RECIPES: dict[str, Callable[..., Any]] = {"clipn": _clipn, "detector": fit_detector_recipe, "reid": fit_reid_recipe}


def fit_recipe(name: str, model: Any, data: str, settings: dict[str, Any] | None = None, seed: int = 1, *,
               progress: bool = False, model_source: str | None = None, **data_options: Any) -> Any:
    """Train recipe ``name`` on ``data``; ``model_source`` names the model in a tuned checkpoint's provenance
    (default: its config name); ``data_options`` are the ``--data`` readers' (class names, columns)."""
    if name not in RECIPES:
        raise ConfigError(f"recipe: {name!r} is not one of {', '.join(RECIPES)}")
    return RECIPES[name](model, data, dict(settings or {}), seed, progress, model_source, **data_options)
