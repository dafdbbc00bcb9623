"""GDA: Gaussian discriminant analysis on frozen features, added to the zero-shot logits.

Wang et al., "A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation", ICLR 2024; official code
mrflogs/ICLR24 (``main_few_shots.py``).

    X      = the features of ``augment_epoch`` augmented views of the K shots, concatenated      [N', D]
    μ_c    = mean of class c's rows;  Z = X - μ_y  (pooled, centred);  S = ZᵀZ / (N' - 1)
    P      = D · (ZᵀZ + tr(S) I)⁻¹        (the empirical-Bayes ridge precision of the official code)
    W      = μ P,   b_c = log(1/C) - ½ μ_c P μ_cᵀ
    logits = 100 · f Tᵀ + α (f Wᵀ + b)

α is chosen on the validation shots over [1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100], as the official code does on its
validation split; with no validation shots α = 1. Differences: the views are those of ``clipforge.adapt.features``
(L2-normalised, as the official code's); validation is CoOp's few-shot set, not the full split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from clipforge.adapt.features import Augmentation
from clipforge.adapt.method import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    FitInputs,
    Fitted,
    Head,
    Method,
    Range,
    Saved,
)
from clipforge.adapt.selection import best_on_validation, clip_logits, validation

ALPHAS = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class GdaSettings:
    augment_epoch: int = 10
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True
    default_alpha: float = 1.0

    RANGES: ClassVar[dict[str, Range]] = {"augment_epoch": AT_LEAST_ONE, "default_alpha": NON_NEGATIVE}


class GdaHead(Head):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, text: torch.Tensor, alpha: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())
        self.register_buffer("text", text.float())
        self.alpha = float(alpha)

    def discriminant(self, features: torch.Tensor) -> torch.Tensor:
        """``f Wᵀ + b`` [N, C]: the log-density of each class up to a shared term."""
        return features @ self.weight.T + self.bias

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return clip_logits(features, self.text) + self.alpha * self.discriminant(features)


def gaussian_discriminant(features: torch.Tensor, labels: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [C, D], b [C]) of GDA with a shared covariance and the official code's shrinkage precision (float64)."""
    x = features.double()
    means = torch.stack([x[labels == c].mean(dim=0) for c in range(classes)])
    centred = x - means[labels]
    dim, count = x.shape[1], x.shape[0]
    covariance = centred.T @ centred / (count - 1)
    precision = dim * torch.linalg.pinv((count - 1) * covariance + covariance.trace() * torch.eye(dim, dtype=x.dtype))
    weight = means @ precision
    bias = math.log(1.0 / classes) - 0.5 * (weight * means).sum(dim=1)
    return weight.float(), bias.float()


def fit_gda(inputs: FitInputs, settings: GdaSettings) -> Fitted:
    train = inputs.shots.train
    views = inputs.cache.augmented(train, settings.augment_epoch, Augmentation(settings.crop_scale, settings.flip))
    labels = torch.as_tensor(train.labels).repeat(len(views))
    weight, bias = gaussian_discriminant(views.reshape(-1, views.shape[-1]), labels, len(inputs.text))
    head = GdaHead(weight, bias, inputs.text, settings.default_alpha)
    extra: dict[str, float] = {"alpha": head.alpha, "val_acc": float("nan")}
    found = validation(inputs)
    if found is not None:
        features, val_labels = found
        zero_shot, discriminant = clip_logits(features, head.text), head.discriminant(features)
        head.alpha, val_accuracy = best_on_validation(ALPHAS, lambda a: zero_shot + a * discriminant, val_labels)
        extra = {"alpha": head.alpha, "val_acc": val_accuracy}
    return Fitted({"weight": weight, "bias": bias}, extra)


def rebuild(saved: Saved) -> Head:
    return GdaHead(saved.tensors["weight"], saved.tensors["bias"], saved.text, saved.extra["alpha"])


GDA = Method("gda", "training-free", GdaSettings, fit_gda, rebuild,
             "Gaussian discriminant with shared covariance (Wang et al., ICLR 2024)", uses_validation=True)
