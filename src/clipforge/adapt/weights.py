"""What the weight-changing methods (CLIP-LoRA, CLIP-SVD, WiSE-FT; the ReID recipe too) share: a trainable copy
of the model, the training protocol of CLIP-LoRA, and the tuned checkpoint's provenance."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from clipforge.adapt.features import Augmentation
from clipforge.adapt.method import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    FitInputs,
    Range,
)
from clipforge.adapt.optim import Schedule
from clipforge.adapt.tuning import Loop, class_tokens, text_embeddings, train_classifier
from clipforge.compress.records import compression_steps
from clipforge.errors import ConfigError
from clipforge.io.state_dict import weights_fingerprint

TRAINING_RANGES: dict[str, Range] = {
    "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "iterations_per_shot": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE,
}
"""The ranges of the settings ``train_weights`` reads."""


def trainable_copy(model: nn.Module, method: str) -> nn.Module:
    """A float copy of ``model`` whose parameters start frozen; refuses models a checkpoint could not hold."""
    if compression_steps(model) or getattr(model.visual, "token_reduction", None) is not None:
        raise ConfigError(f"{method}: tune the uncompressed model (this one records compression steps)")
    tuned = copy.deepcopy(model).float()
    for parameter in tuned.parameters():
        parameter.requires_grad_(False)
    return tuned


def train_weights(inputs: FitInputs, tuned: nn.Module, parameters: list[nn.Parameter], settings: Any,
                  classes: Callable[[], torch.Tensor], description: str, eta_min: float = 0.0) -> tuple[float, int]:
    """CLIP-LoRA's protocol: AdamW with cosine decay to ``eta_min`` over ``iterations_per_shot × K`` steps of
    ``batch_size`` augmented images; the last loss and the number of steps."""
    loop = Loop(settings.iterations_per_shot * inputs.shots.shots, settings.batch_size,
                Augmentation(settings.crop_scale, settings.flip), inputs.shots.seed, settings.amp)
    schedule = Schedule("adamw", settings.lr, loop.steps, weight_decay=settings.weight_decay, eta_min=eta_min)
    loss = train_classifier(tuned, parameters, inputs.shots.train, loop, schedule, classes, progress=inputs.progress,
                            description=description)
    return loss, loop.steps


def tuned_text(tuned: nn.Module, inputs: FitInputs) -> Any:
    """A function giving the tuned model's class embeddings for the shots' classes and templates."""
    tokens, per_class = class_tokens(tuned, inputs.shots.classnames, inputs.shots.templates)
    return lambda: text_embeddings(tuned, tokens, per_class)


def tuned_model(tuned: nn.Module, method: str, start: nn.Module, source: str) -> nn.Module:
    """``tuned`` ready to save: its provenance names ``method`` and, as ``clipforge train`` records it, the model it
    was tuned from (``base``: ``source`` and the ``weights_fingerprint`` of ``start``), which ``clipforge merge``
    checks against its base."""
    tuned.eval()
    for parameter in tuned.parameters():
        parameter.requires_grad_(True)
    base = {"source": source, "fingerprint": weights_fingerprint(start.state_dict())}
    tuned.provenance = {**getattr(tuned, "provenance", {}), "tuned_by": method, "base": base}
    return tuned
