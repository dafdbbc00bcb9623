"""What the weight-changing methods (CLIP-LoRA, CLIP-SVD, WiSE-FT) share: a trainable copy of the model, the
step budget of CLIP-LoRA's protocol, and the tuned checkpoint's provenance."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from clipforge.adapt.features import Augmentation
from clipforge.adapt.method import FitInputs
from clipforge.adapt.tuning import Loop, class_tokens, text_embeddings
from clipforge.compress.records import compression_steps
from clipforge.errors import ConfigError


def trainable_copy(model: nn.Module, method: str) -> nn.Module:
    """A float copy of ``model`` whose parameters start frozen; refuses models a checkpoint could not hold."""
    if compression_steps(model) or getattr(model.visual, "token_reduction", None) is not None:
        raise ConfigError(f"{method}: tune the uncompressed model (this one records compression steps)")
    tuned = copy.deepcopy(model).float()
    for parameter in tuned.parameters():
        parameter.requires_grad_(False)
    return tuned


def iterations_loop(inputs: FitInputs, iterations_per_shot: int, batch_size: int, crop_scale: tuple[float, float],
                    flip: bool, amp: bool) -> Loop:
    """CLIP-LoRA's and CLIP-SVD's budget: ``iterations_per_shot × K`` steps of ``batch_size`` images."""
    if iterations_per_shot < 1:
        raise ConfigError(f"iterations_per_shot: {iterations_per_shot} is below 1")
    steps = iterations_per_shot * inputs.shots.shots
    return Loop(steps, batch_size, Augmentation(crop_scale, flip), inputs.shots.seed, amp)


def tuned_text(tuned: nn.Module, inputs: FitInputs) -> Any:
    """A function giving the tuned model's class embeddings for the shots' classes and templates."""
    tokens, per_class = class_tokens(tuned, inputs.shots.classnames, inputs.shots.templates)
    return lambda: text_embeddings(tuned, tokens, per_class)


def tuned_model(tuned: nn.Module, method: str) -> nn.Module:
    tuned.eval()
    for parameter in tuned.parameters():
        parameter.requires_grad_(True)
    tuned.provenance = {**getattr(tuned, "provenance", {}), "tuned_by": method}
    return tuned
