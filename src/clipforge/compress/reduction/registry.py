"""Put token merging or pruning on a model's image tower, record it, and count what it saves.

``apply_token_reduction(model, "tome", r=8)`` sets ``model.visual.token_reduction`` and records
``model.compression = {"method": "tome", "settings": {...every setting, defaults filled in...}}`` as plain
JSON values, so checkpoint metadata can store it and ``apply_token_reduction(model, method, **settings)``
rebuilds the same reduction. ``token_counts`` and ``estimate_flops`` give the per-block token counts and the
block FLOPs for equal-FLOPs comparisons between methods.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from clipforge.compress.reduction.evit import EViT
from clipforge.compress.reduction.pitome import PiToMe
from clipforge.compress.reduction.schedules import ScheduledReduction
from clipforge.compress.reduction.tome import ToMe
from clipforge.compress.settings import typed_settings
from clipforge.errors import ConfigError
from clipforge.models.vit import image_tower

METHODS: dict[str, type[ScheduledReduction]] = {"tome": ToMe, "pitome": PiToMe, "evit": EViT}


def resolve_settings(method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Every setting of ``method`` with the defaults filled in, each given one read as its parameter's type
    (``clipforge.compress.settings``: ``"False"`` is false, ``"3,6,9"`` a list); rejects unknown names and values
    of the wrong type."""
    if method not in METHODS:
        raise ConfigError(f"unknown token reduction method {method!r}; choose one of {sorted(METHODS)}")
    init = METHODS[method].__init__
    names = [name for name in inspect.signature(init).parameters if name not in ("self", "num_layers")]
    return typed_settings(method, init, names, settings)


def build_token_reduction(method: str, num_layers: int, **settings: Any) -> ScheduledReduction:
    """The reduction ``method`` (``"tome"``, ``"pitome"``, ``"evit"``) for a tower of ``num_layers`` blocks."""
    resolved = resolve_settings(method, settings)
    return METHODS[method](num_layers, **resolved)


def apply_token_reduction(model: nn.Module, method: str, **settings: Any) -> ScheduledReduction:
    """Install ``method`` on the image tower of ``model`` (a CLIP model or a ``VisionTransformer``) and record it."""
    tower = image_tower(model)
    resolved = resolve_settings(method, settings)
    reduction = METHODS[method](tower.cfg.layers, **resolved)
    tower.token_reduction = reduction
    model.compression = {"method": method, "settings": resolved}
    return reduction


def remove_token_reduction(model: nn.Module) -> None:
    """Take the token reduction off the image tower and drop its step from ``model.compression``.

    Other recorded steps (a number format such as bf16 or int8-dynamic, see ``clipforge.compress.records``)
    stay recorded: they still describe the model.
    """
    image_tower(model).token_reduction = None
    record = getattr(model, "compression", None)
    if record is None:
        return
    steps = record["steps"] if "steps" in record else [record]
    kept = [step for step in steps if step["method"] not in METHODS]
    if not kept:
        del model.compression
    else:
        model.compression = kept[0] if len(kept) == 1 else {"steps": kept}


def token_counts(model: nn.Module, method: str | None = None, **settings: Any) -> list[int]:
    """Tokens entering each image block, then leaving the last one (``layers + 1`` numbers).

    With ``method``, for that reduction with ``settings``; without, for the reduction installed on the model
    (or none). Counts are per image at the tower's configured resolution, class token included.
    """
    tower = image_tower(model)
    tokens = tower.grid_size**2 + 1
    if method is not None:
        reduction = build_token_reduction(method, tower.cfg.layers, **settings)
    else:
        reduction = tower.token_reduction
    if reduction is None:
        return [tokens] * (tower.cfg.layers + 1)
    if not isinstance(reduction, ScheduledReduction):
        raise ConfigError(f"token counts are unknown for the installed {type(reduction).__name__}")
    return reduction.token_counts(tokens)


def estimate_flops(model: nn.Module, method: str | None = None, **settings: Any) -> int:
    """Multiply-accumulates of the image blocks per image (the unit ViT papers report as FLOPs).

    Per block, as PiToMe's ``calculate_block_flop``: attention ``4NC² + 2N²C`` on the ``N`` tokens entering
    it and the MLP ``2·N'·C·hidden`` on the ``N'`` tokens left after the reduction. Patch embedding, head
    and the matching itself are not counted. ``method``/``settings`` as ``token_counts``.
    """
    tower = image_tower(model)
    width = tower.cfg.width
    hidden = int(width * tower.cfg.mlp_ratio)
    counts = token_counts(model, method, **settings)
    total = 0
    for entering, leaving in zip(counts[:-1], counts[1:], strict=True):
        total += 4 * entering * width**2 + 2 * entering**2 * width + 2 * leaving * width * hidden
    return total
