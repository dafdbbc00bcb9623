"""WiSE-FT: the weights of a fine-tuned model interpolated with the zero-shot model's, θ = (1 - α) θ₀ + α θ₁.

Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022; official code mlfoundations/wise-ft
(``src/wise_ft.py``: ``_merge``; ``src/models/finetune.py``).

The fine-tuned endpoint θ₁ is either given (``finetuned``: a fine-tune of the model, e.g. a CLIP-LoRA or CLIP-SVD
result, checked as ``clipforge merge`` checks its models: the base it records, else weights near the model's) or
trained here: the image tower end to end, classifying with the frozen zero-shot head of the dataset's prompts (CE
on ``exp(logit_scale) · cos``, AdamW lr 3e-5, weight decay 0.1, cosine, batches of 32 augmented images). α = 0 is the zero-shot model, α = 1 the fine-tuned one;
the paper's default with no held-out data is α = 0.5.

Differences: the official fine-tune also trains the classification head (initialised from the zero-shot
head); here the head is the text tower's, kept frozen, so that the result stays a CLIP checkpoint and the
interpolation covers every weight that changed. The paper fine-tunes on full datasets (10 epochs, batch 512);
on few shots the budget is CLIP-LoRA's protocol (``iterations_per_shot × K`` steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from clipforge.adapt.method import UNIT, FitInputs, Fitted, Method, Range
from clipforge.adapt.weights import (
    TRAINING_RANGES,
    train_weights,
    trainable_copy,
    tuned_model,
    tuned_text,
)
from clipforge.api import load
from clipforge.errors import CheckpointError
from clipforge.io.lineage import check_origin
from clipforge.io.state_dict import check_state_dict, weights_fingerprint


@dataclass(frozen=True)
class WiseFtSettings:
    alpha: float = 0.5
    finetuned: str = ""
    lr: float = 3e-5
    weight_decay: float = 0.1
    iterations_per_shot: int = 500
    batch_size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    amp: bool = False

    RANGES: ClassVar[dict[str, Range]] = {**TRAINING_RANGES, "alpha": UNIT}


def interpolate(zero_shot: nn.Module, finetuned: nn.Module, alpha: float) -> nn.Module:
    """A copy of ``finetuned`` with every floating-point weight ``(1 - α) θ₀ + α θ₁`` (exact at α = 0 and 1)."""
    start, end = zero_shot.state_dict(), finetuned.state_dict()
    if start.keys() != end.keys() or any(start[k].shape != end[k].shape for k in start):
        raise CheckpointError("wise-ft: the fine-tuned model's weights do not match the zero-shot model's")
    mixed = {key: (1 - alpha) * start[key] + alpha * end[key] if end[key].is_floating_point() else end[key] for key in end}
    result = trainable_copy(finetuned, "wise-ft")
    result.load_state_dict(mixed)
    return result


def load_finetuned(inputs: FitInputs, path: str) -> nn.Module:
    """The checkpoint ``path``, refused in one line when it is not a fine-tune of ``inputs.model`` (the check of
    ``clipforge merge``: a model from another initialisation would blend into noise)."""
    finetuned = load(path)
    start, end = (_float32(model) for model in (inputs.model, finetuned))
    check_state_dict(start, end, path)
    check_origin(finetuned.provenance, end, path, start, weights_fingerprint(start), inputs.model_source)
    return finetuned


def _float32(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", torch.float32) for key, value in model.state_dict().items()}


def fine_tune_image_tower(inputs: FitInputs, settings: WiseFtSettings) -> nn.Module:
    tuned = trainable_copy(inputs.model, "wise-ft")
    parameters = list(tuned.visual.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    with torch.no_grad():
        head = tuned_text(tuned, inputs)()
    train_weights(inputs, tuned, parameters, settings, lambda: head, "WiSE-FT fine-tuning")
    return tuned


def fit_wise_ft(inputs: FitInputs, settings: WiseFtSettings) -> Fitted:
    finetuned = load_finetuned(inputs, settings.finetuned) if settings.finetuned else fine_tune_image_tower(inputs, settings)
    mixed = interpolate(inputs.model, finetuned, settings.alpha)
    return Fitted({}, {"alpha": settings.alpha}, model=tuned_model(mixed, "wise-ft", inputs.model, inputs.model_source))


WISE_FT = Method("wise-ft", "weights", WiseFtSettings, fit_wise_ft, None,
                 "weight-space interpolation of fine-tuned and zero-shot models (Wortsman et al., CVPR 2022)")
