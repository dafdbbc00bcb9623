"""Contrastive image-text losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid.

Semantics, defaults and the distributed variants follow open_clip's ``open_clip/loss.py`` (value and
gradient parity is tested against it):

- ``ClipLoss``: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
  Supervision" (Figure 3 pseudo-code), across ranks with open_clip's ``--local-loss`` / ``--gather-with-grad``.
- ``SigLipLoss``: Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training" (Algorithm 1, and the
  chunked cross-device implementation of §3.3).

Distillation towards a teacher's affinities (TinyCLIP, MobileCLIP) builds on ``ClipLoss``:
``clipforge.distill.losses.AffinityMimickingLoss``.

Every ``logit_scale`` argument is the already-exponentiated scale (``model.logit_scale.exp()``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipforge.train.distributed import (
    gather_features,
    other_ranks_blocks,
    rank_and_world_size,
)

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)  # learnable log-temperature init, Radford et al. 2021 §2.5
MAX_LOGIT_SCALE = math.log(100)  # clamp for the log-scale "to prevent scaling the logits by more than 100"
SIGLIP_INIT_LOGIT_SCALE = math.log(10)  # Zhai et al. 2023, Algorithm 1: t' = log 10
SIGLIP_INIT_LOGIT_BIAS = -10.0  # Zhai et al. 2023, Algorithm 1: b = -10


def _check_pair(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features {tuple(text_features.shape)} "
            "must both be [batch, dim] with the same shape"
        )


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: mean of the image→text and text→image cross-entropies over scaled cosine logits.

    In a process group the features of all ranks are gathered (``gather_features``). Without
    ``local_loss`` every rank computes the full (B·W)² logit matrix; with it each rank computes only its
    B × (B·W) rows with labels ``arange(B) + B·rank`` (the mean over ranks is the same loss, memory linear
    in the global batch). Without ``gather_with_grad`` gradients reach only the local features, as in
    open_clip; with it they are exact (each rank receives W× the full-batch gradient, which DDP's
    averaging over ranks turns back into the full-batch gradient).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self._labels: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def labels(self, num_rows: int, device: torch.device) -> torch.Tensor:
        """Index of each row's positive column: ``arange(B)``, offset by ``B·rank`` for a local loss."""
        rank, world_size = rank_and_world_size()
        offset = num_rows * rank if self.local_loss and world_size > 1 else 0
        key = (device, num_rows, offset)
        if key in self._labels:
            return self._labels[key]
        labels = torch.arange(offset, offset + num_rows, device=device, dtype=torch.long)
        if self.cache_labels:
            self._labels[key] = labels
        return labels

    def logits(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of ``scale·img @ txtᵀ (+ bias)`` and of its transpose: (per_image, per_text)."""
        _check_pair(image_features, text_features)
        all_image, all_text = gather_features(
            image_features, text_features, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad
        )
        if self.local_loss:
            per_image = logit_scale * image_features @ all_text.T
            per_text = logit_scale * text_features @ all_image.T
        else:
            per_image = logit_scale * all_image @ all_text.T
            per_text = per_image.T
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        return per_image, per_text

    def contrastive(self, logits_per_image: torch.Tensor, logits_per_text: torch.Tensor) -> torch.Tensor:
        """Mean of the two cross-entropies against the diagonal (offset on this rank's rows)."""
        labels = self.labels(logits_per_image.shape[0], logits_per_image.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.contrastive(*self.logits(image_features, text_features, logit_scale, logit_bias))


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss: ``−Σ_ij log σ(z_ij · (scale · img_i·txt_j + bias)) / B``, z = 2·I − 1.

    Across ranks each rank adds the all-negative blocks of every other rank's text features, received one
    block at a time from its ring neighbours with gradients flowing back to the owner (Zhai et al. 2023
    §3.3; open_clip's 'bidir' exchange). Each remote block's logits are recomputed in the backward pass,
    so a rank holds O(B·B) logits rather than O(B·B·W). The per-rank loss is normalised by the local
    batch B, so the mean over ranks equals the single-process loss on the global batch.
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_pair(image_features, text_features)
        loss = _sigmoid_block_loss(image_features, text_features, logit_scale, logit_bias, True)
        for remote_text in other_ranks_blocks(text_features):
            loss = loss + checkpoint(
                _sigmoid_block_loss, image_features, remote_text, logit_scale, logit_bias, False, use_reentrant=False
            )
        return loss


def _sigmoid_block_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    matched: bool,
) -> torch.Tensor:
    """Sigmoid loss of one B × B block; ``matched`` marks the diagonal as positives, else all pairs are negatives."""
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits = logits + logit_bias
    signs = -torch.ones_like(logits)
    if matched:
        signs.diagonal().fill_(1.0)
    return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]
