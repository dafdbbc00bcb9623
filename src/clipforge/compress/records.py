"""Compression steps as data: apply them to a model, record them on it, replay them from a checkpoint.

    from clipforge.compress.records import apply_compression, apply_steps, parse_step
    model = apply_compression(model, "tome", r=8)           # token merging, in place
    model = apply_compression(model, "int8-dynamic")        # a quantized copy; always use the returned model
    model.compression                                       # {"steps": [{"method": "tome", ...}, {"method": "int8-dynamic", ...}]}
    model = apply_steps(clipforge.load("base.safetensors"), [parse_step("pitome:keep_ratio=0.9"), parse_step("bf16")])

A step is ``{"method": name, "settings": {...every setting, defaults filled in...}}`` in plain JSON values.
``model.compression`` holds one step as it is (the form ``apply_token_reduction`` has always written, so
older checkpoints read unchanged) and several as ``{"steps": [step, ...]}`` in the order they were applied.
Methods: the token reductions ``tome``, ``pitome``, ``evit`` (``clipforge.compress.reduction.registry``), and the
number formats ``bf16`` (weights and activations in bfloat16) and ``int8-dynamic`` (``quantize_dynamic_int8``).
A model takes at most one token reduction and one number format; in either order they stack. As text
(``--compress``, report variants): ``parse_steps("bf16+tome:r=8")``, and back with ``describe_steps``.

Checkpoints (``clipforge.save``/``load``) store the weights the steps start from and replay the steps on
load. A bf16 model stores its bf16 weights (bf16 → fp32 → bf16 is exact). An int8-dynamic model cannot
give its float weights back (rounding loses them), so ``apply_compression`` keeps a copy of the float
weights it quantized on the model (``float_weights``, CPU tensors: the memory of one float model) and
``checkpoint_tensors`` hands those to ``save``; ``load`` quantizes again, with the same result. Statically
quantized (``quantize_static_int8``) and simulated models are refused: their activation scales come from
calibration data the checkpoint would not hold.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from clipforge.compress.quant.int8 import is_linear_form, quantize_dynamic_int8
from clipforge.compress.reduction.registry import METHODS as TOKEN_REDUCTIONS
from clipforge.compress.reduction.registry import (
    apply_token_reduction,
    resolve_settings,
)
from clipforge.compress.settings import typed_settings
from clipforge.errors import CheckpointError, ConfigError
from clipforge.models.clip import CLIP

Step = dict[str, Any]

NUMBER_FORMATS = ("bf16", "int8-dynamic")
STEP_METHODS = (*TOKEN_REDUCTIONS, *NUMBER_FORMATS)
ALIASES = {"int8": "int8-dynamic"}
FLOAT_WEIGHTS = "float_weights"


# ------------------------------------------------------------------------------------------ steps


def make_step(method: str, **settings: Any) -> Step:
    """The step ``method`` with ``settings`` checked and every default filled in (``ConfigError`` if bad)."""
    method = ALIASES.get(method, method)
    if method in TOKEN_REDUCTIONS:
        return {"method": method, "settings": resolve_settings(method, settings)}
    if method == "bf16":
        if settings:
            raise ConfigError(f"bf16 takes no settings, got {sorted(settings)}")
        return {"method": method, "settings": {}}
    if method == "int8-dynamic":
        return {"method": method, "settings": _int8_settings(settings)}
    raise ConfigError(f"unknown compression method {method!r}; choose one of {', '.join(STEP_METHODS)} (or int8)")


def _int8_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``quantize_dynamic_int8``'s recordable settings (``per_channel``); the engine is the loading machine's."""
    return typed_settings("int8-dynamic", quantize_dynamic_int8, ["per_channel"], settings)


def parse_step(spec: str) -> Step:
    """``"METHOD"`` or ``"METHOD:key=value,key=value"`` → a step (``"tome:r=8,inflect=-1"``, ``"evit:layers=[3,6,9]"``).

    Values are read as JSON (numbers, ``true``/``false``, ``[lists]``), anything else as text, and then as the
    setting's type (``clipforge.compress.settings``); ``-`` in keys reads as ``_`` (``keep-ratio`` = ``keep_ratio``).
    """
    method, _, rest = spec.partition(":")
    return make_step(method.strip(), **parse_settings(_split_top_level(rest), f"--compress {spec!r}"))


def parse_steps(spec: str) -> list[Step]:
    """Steps joined by ``+``: ``"bf16+tome:r=8"`` → ``[bf16, tome r=8]``, each as ``parse_step``."""
    return [parse_step(part) for part in spec.split("+")]


def parse_settings(assignments: Iterable[str], where: str) -> dict[str, Any]:
    """``["key=value", ...]`` → settings, values as in ``parse_step``; ``ConfigError`` naming ``where`` if malformed."""
    settings: dict[str, Any] = {}
    for item in assignments:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ConfigError(f"{where}: expected key=value settings (METHOD:key=value,key=value), got {item!r}")
        settings[key.strip().replace("-", "_")] = _json_or_text(value.strip())
    return settings


def describe_steps(steps: Iterable[Step]) -> str:
    """The shortest ``parse_steps`` spec of ``steps``: settings left at their defaults are omitted (``"bf16+tome:r=8"``)."""
    parts = []
    for step in steps:
        defaults = make_step(step["method"])["settings"]
        changed = [
            f"{key}={value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))}"
            for key, value in step["settings"].items()
            if defaults.get(key) != value
        ]
        parts.append(step["method"] + (":" + ",".join(changed) if changed else ""))
    return "+".join(parts)


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"r=[1,2],inflect=0"`` → ``["r=[1,2]", "inflect=0"]``."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    items.append(text[start:])
    return [item for item in items if item.strip()]


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


# ---------------------------------------------------------------------------------------- records


def compression_steps(model: nn.Module) -> list[Step]:
    """The steps recorded on ``model`` (``model.compression``), oldest first; [] for an uncompressed model."""
    record = getattr(model, "compression", None)
    return [] if not record else steps_of_record(record)


def steps_of_record(record: Any, source: str = "compression record") -> list[Step]:
    """The steps of a record (one step, or ``{"steps": [...]}``), each checked; ``CheckpointError`` naming ``source``."""
    steps = record.get("steps") if isinstance(record, dict) and "steps" in record else [record]
    if not isinstance(steps, list) or not steps:
        raise CheckpointError(f"{source}: expected a compression step or {{'steps': [...]}}, got {record!r}")
    checked = []
    for step in steps:
        if not isinstance(step, dict) or not isinstance(step.get("method"), str) or not isinstance(step.get("settings", {}), dict):
            raise CheckpointError(f"{source}: malformed compression step {step!r}; expected {{'method': ..., 'settings': {{...}}}}")
        try:
            checked.append(make_step(step["method"], **step.get("settings", {})))
        except ConfigError as error:
            raise CheckpointError(f"{source}: {error}") from None
    return checked


def record_of(steps: Sequence[Step]) -> dict[str, Any]:
    """The ``model.compression`` value for ``steps``: the step itself when there is one, else ``{"steps": [...]}``."""
    return dict(steps[0]) if len(steps) == 1 else {"steps": [dict(step) for step in steps]}


def number_format(steps: Iterable[Step]) -> str | None:
    """``"bf16"`` or ``"int8-dynamic"`` when one of ``steps`` sets the number format, else None."""
    return next((step["method"] for step in steps if step["method"] in NUMBER_FORMATS), None)


# -------------------------------------------------------------------------------------- applying


def apply_compression(model: CLIP, method: str, **settings: Any) -> CLIP:
    """Apply one step on top of the steps ``model`` already records, and record it; returns the model to use.

    Token reductions and bf16 change ``model`` in place and return it; int8-dynamic returns a quantized copy
    (CPU only) that keeps the float weights for ``clipforge.save``, and leaves ``model`` as it was.
    """
    return _apply(model, make_step(method, **settings))


def apply_steps(model: CLIP, steps: Iterable[Step]) -> CLIP:
    """Apply ``steps`` in order (``apply_compression`` for each); returns the model to use."""
    for step in steps:
        model = _apply(model, make_step(step["method"], **step.get("settings", {})))
    return model


def check_stack(steps: Sequence[Step]) -> None:
    """``ConfigError`` unless ``steps`` hold at most one token reduction and one number format."""
    for index, step in enumerate(steps):
        method = step["method"]
        kind = "token reduction" if method in TOKEN_REDUCTIONS else "number format"
        clash = next((s["method"] for s in steps[:index] if (s["method"] in TOKEN_REDUCTIONS) == (method in TOKEN_REDUCTIONS)), None)
        if clash is not None:
            raise ConfigError(
                f"cannot apply {method}: the model already has the {kind} {clash}, and a model takes one {kind}; "
                "start from the uncompressed model"
            )


def _apply(model: CLIP, step: Step) -> CLIP:
    if not isinstance(model, CLIP):
        raise ConfigError(f"compression needs a clipforge CLIP model, got {type(model).__name__}")
    steps = compression_steps(model)
    check_stack([*steps, step])
    method = step["method"]
    if method in TOKEN_REDUCTIONS:
        apply_token_reduction(model, method, **step["settings"])
    elif method == "bf16":
        model = model.to(torch.bfloat16)
    else:
        float_weights = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
        model = quantize_dynamic_int8(model, **step["settings"])
        setattr(model, FLOAT_WEIGHTS, float_weights)
    model.compression = record_of([*steps, step])
    return model


def restore_compression(model: CLIP, record: Any, *, precision: str, source: str) -> CLIP:
    """Replay a checkpoint's ``record`` on the model just loaded from ``source`` with ``precision`` (``load``).

    A recorded number format decides the precision: ``precision`` must then be ``"fp32"`` (the default) or
    the recorded one, and int8-dynamic needs the model on the CPU. Steps that do not fit together or do
    not fit the model (two token reductions, an EViT layer the tower lacks) are a ``CheckpointError``.
    """
    steps = steps_of_record(record, source)
    recorded = number_format(steps)
    if recorded is not None and precision not in ("fp32", recorded):
        raise ConfigError(f"{source}: the checkpoint records {recorded}, so it runs in that format; leave out --precision {precision} (precision= in Python)")
    if recorded == "int8-dynamic" and model.logit_scale.device.type != "cpu":
        raise ConfigError(f"{source}: the checkpoint records int8-dynamic, which runs on the CPU only; load it with device='cpu'")
    try:
        return apply_steps(model, steps)
    except ConfigError as error:
        raise CheckpointError(f"{source}: bad compression record: {error}") from None


def checkpoint_tensors(model: CLIP) -> dict[str, torch.Tensor]:
    """The tensors ``clipforge.save`` writes: the state dict, or the kept float weights of an int8-dynamic model."""
    if not is_linear_form(model):
        return model.state_dict()
    if getattr(model, FLOAT_WEIGHTS, None) is not None and number_format(compression_steps(model)) == "int8-dynamic":
        return getattr(model, FLOAT_WEIGHTS)
    raise CheckpointError(
        "cannot save a quantized or simulated model that does not record its float weights: static int8 "
        "(quantize_static_int8) depends on calibration data a checkpoint does not hold; save the float model and "
        "use dynamic int8 (clipforge compress int8, or apply_compression(model, 'int8-dynamic')) or ONNX int8 "
        "(clipforge compress onnx --int8)"
    )

