"""The trainer's extension point: what a run minimises beyond the model's own contrastive loss.

``train(config, objective=...)`` runs the one training loop (exact resume, torchrun, progress bar, periodic
evaluation) for any ``Objective``. The base class is plain contrastive training with the loss of
``config.loss`` (CLIP's InfoNCE or SigLIP's sigmoid loss); a subclass may

- replace the loss (``loss_fn``), called as ``loss_fn(image_features, text_features, *head, **targets)``;
- supply per-batch targets (``targets``): a teacher's features computed online, or embeddings stored with
  the data and handed over by the loader as the batch's ``extras``;
- replace the data source (``source``), e.g. shards carrying stored augmentations and teacher embeddings
  (a source with ``load_train``, see ``clipforge.data.loader.TrainSamples``);
- prepare the model before the optimizer is built (``prepare``: fix the temperature, attach masks) and add
  trainable state of its own (``param_groups``; ``state_dict``/``load_state_dict`` travel in the resume
  state, so a resumed run is exact);
- follow the step (``begin_step``) and add figures to the logged rows (``metrics``).

``clipforge.distill`` builds TinyCLIP's and MobileCLIP's distillation on it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clipforge.data.sources import CaptionSource
from clipforge.train.config import LossSection, TrainConfig
from clipforge.train.losses import ClipLoss, SigLipLoss


class Objective:
    """Plain contrastive training (the default of ``train``); subclasses override the hooks they need."""

    def __init__(self, loss: LossSection) -> None:
        self.loss_settings = loss

    def loss_fn(self) -> nn.Module:
        """The module the step calls as ``loss_fn(image_features, text_features, *head, **targets)``."""
        if self.loss_settings.kind == "siglip":
            return SigLipLoss()
        return ClipLoss(self.loss_settings.local_loss, self.loss_settings.gather_with_grad)

    def source(self, config: TrainConfig) -> CaptionSource | None:
        """The training data, or None for ``config.data.train``."""
        return None

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        """Called once the model is built (and its resumed weights loaded), before the optimizer is made."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Extra optimizer groups (trainable state outside the model); ``fixed_lr`` groups skip the schedule."""
        return []

    def begin_step(self, step: int) -> None:
        """Called before each step with its number (counted from 0 over the whole run)."""

    def targets(self, images: torch.Tensor, texts: torch.Tensor, extras: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """Keyword arguments of ``loss_fn`` for this batch (teacher features); ``extras`` come from the loader."""
        return {}

    def metrics(self) -> dict[str, float]:
        """Figures added to each logged row (e.g. the parts of a combined loss)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Trainable state saved with every checkpoint's resume state."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` when resuming."""
