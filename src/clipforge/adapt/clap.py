"""CLAP: a linear probe initialised with the zero-shot head and held near it by class-wise multipliers.

Silva-Rodríguez et al., "A Closer Look at the Few-Shot Adaptation of Large Vision-Language Models", CVPR 2024;
official code jusiro/CLAP (``trainers/adapters.py``, ``configs/trainers/SGD_lr1e-1_B256_ep300.yaml``).

    logits = τ · cos(f, w_c)            τ = exp(logit_scale) of the model, w initialised to the text base T
    loss   = CE + mean_c λ_c ‖w_c − t_c‖²
    λ_c    = mean over class c's (augmented) shots of their zero-shot probability of class c

The text base ``t_c`` is the mean of class c's prompt embeddings *as the text tower outputs them*, not
normalised (``_get_base_text_features``): the logits normalise ``w_c``, but the constraint and SGD's steps act
on that scale, so a tower whose text embeddings have norm ``n`` turns a step into an angle ``n²`` times smaller
than unit vectors would, and its constraint ``n²`` times stiffer.

Features: 20 augmented views of the shots (``epochs_aumentation``), pre-extracted. SGD (momentum 0.9, as
Dassl's default) lr 0.1, no weight decay, batch 256, 300 epochs of ``ceil(N / 256)`` batches each (N the
number of shots: the official loop takes ``len(train_loader)`` batches of the shuffled augmented features per
epoch), cosine schedule after one warm-up epoch at 1e-5. No validation set: that is CLAP's point.
``constraint = "adaptive"`` adds the augmented-Lagrangian outer step (``outer_step``, PHR) after each epoch;
the default ``"l2"`` keeps λ fixed, as the paper's reported runs do.

Differences: views come from ``clipforge.adapt.features`` (L2-normalised; CLAP normalises them in the forward
anyway); the batch drawn per step is a shuffled slice of the views, as in the official loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from clipforge.adapt.features import Augmentation
from clipforge.adapt.method import (
    AT_LEAST_ONE,
    POSITIVE,
    FitInputs,
    Fitted,
    Head,
    Method,
    Range,
    Saved,
)
from clipforge.adapt.optim import Schedule, epoch_batches, optimise
from clipforge.errors import ConfigError
from clipforge.eval.perception import ensemble_text_embeddings
from clipforge.eval.zeroshot import fill_template


@dataclass(frozen=True)
class ClapSettings:
    augment_epoch: int = 20
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True
    epochs: int = 300
    lr: float = 0.1
    batch_size: int = 256
    constraint: str = "l2"  # or "adaptive"

    RANGES: ClassVar[dict[str, Range]] = {
        "augment_epoch": AT_LEAST_ONE, "epochs": AT_LEAST_ONE, "lr": POSITIVE, "batch_size": AT_LEAST_ONE,
    }


class PrototypeHead(Head):
    """``τ · cos(f, w_c)``."""

    def __init__(self, prototypes: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("prototypes", prototypes.float())
        self.scale = float(scale)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=-1) @ F.normalize(self.prototypes, dim=-1).T


def text_base(model: Any, classnames: Sequence[str], templates: Any) -> torch.Tensor:
    """CLAP's ``base_text_features`` [C, D]: per class, the mean of its prompts' unnormalised text embeddings.

    ``templates`` as the zero-shot head takes them: format strings (or callables) for every class, or a mapping
    from class name to its own descriptions."""
    groups = [list(templates[c]) if isinstance(templates, Mapping) else [fill_template(t, c) for t in templates]
              for c in classnames]
    return ensemble_text_embeddings(model, groups, normalize=False)


def zero_shot_multipliers(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """CLAP's ``init_lagrangian_multipliers``: per class, the mean zero-shot softmax probability of that class
    over its own samples."""
    probabilities = (scale * features @ text.T).softmax(dim=-1)
    one_hot = F.one_hot(labels, len(text)).float()
    return (probabilities * one_hot).sum(dim=0) / one_hot.sum(dim=0)


def _phr_step(multipliers: torch.Tensor, penalty: torch.Tensor, distance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLAP's ``outer_step``: λ ← max(0, λ + ρ h) (the PHR gradient), then ρ ← h."""
    return torch.clamp(multipliers + penalty * distance, min=0.0), distance.clone()


def fit_clap(inputs: FitInputs, settings: ClapSettings) -> Fitted:
    if settings.constraint not in ("l2", "adaptive"):
        raise ConfigError(f"clap.constraint: {settings.constraint!r} is not 'l2' or 'adaptive'")
    train = inputs.shots.train
    views = inputs.cache.augmented(train, settings.augment_epoch, Augmentation(settings.crop_scale, settings.flip))
    features = views.reshape(-1, views.shape[-1])
    labels = torch.as_tensor(train.labels).repeat(len(views))
    scale = float(inputs.model.logit_scale.detach().exp())
    text = text_base(inputs.model, inputs.shots.classnames, inputs.shots.templates).clone()  # not an inference tensor
    multipliers = zero_shot_multipliers(features, labels, F.normalize(text, dim=-1), scale)
    penalty = torch.zeros_like(multipliers)
    prototypes = torch.nn.Parameter(text.clone())
    per_epoch = max(1, len(train) // settings.batch_size) if len(train) >= settings.batch_size else 1
    shuffled = epoch_batches(len(features), settings.batch_size, settings.epochs, inputs.shots.seed)
    per_pass = math.ceil(len(features) / settings.batch_size)
    batches = [shuffled[epoch * per_pass + b] for epoch in range(settings.epochs) for b in range(per_epoch)]

    def loss_at(step: int) -> torch.Tensor:
        rows = batches[step]
        logits = scale * F.normalize(features[rows], dim=-1) @ F.normalize(prototypes, dim=-1).T
        constraint = (multipliers * (prototypes - text).pow(2).sum(dim=-1)).mean()
        return F.cross_entropy(logits, labels[rows]) + constraint

    def after_step(step: int) -> None:
        nonlocal multipliers, penalty
        if settings.constraint == "adaptive" and (step + 1) % per_epoch == 0:
            multipliers, penalty = _phr_step(multipliers, penalty, (prototypes.detach() - text).pow(2).sum(dim=-1))

    schedule = Schedule("sgd", settings.lr, len(batches), warmup=per_epoch)
    optimise([prototypes], schedule, loss_at, progress=inputs.progress, description="CLAP", after_step=after_step)
    return Fitted({"prototypes": prototypes.detach()}, {"scale": scale})


def rebuild(saved: Saved) -> Head:
    return PrototypeHead(saved.tensors["prototypes"], saved.extra["scale"])


CLAP = Method("clap", "head", ClapSettings, fit_clap, rebuild,
              "zero-shot-initialised linear probe with class-wise constraint (Silva-Rodríguez et al., CVPR 2024)")
