"""Affinity mimicking: the student's in-batch image↔text distributions matched to a teacher's (or an ensemble's).

TinyCLIP (Wu et al., "TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance", ICCV 2023,
Eq. 1–3; microsoft/Cream ``TinyCLIP/src/open_clip/clip_soft_loss.py::ClipSoftLoss``)::

    A_s^{I2T} = softmax(s_s · I_s T_sᵀ)    A_t^{I2T} = softmax(s_t · I_t T_tᵀ)     (rows: this rank's images,
    A_s^{T2I} = softmax(s_s · T_s I_sᵀ)    A_t^{T2I} = softmax(s_t · T_t I_tᵀ)      columns: every rank's texts)
    L_distill = ½ · ( CE(A_t^{I2T}, A_s^{I2T}) + CE(A_t^{T2I}, A_s^{T2I}) ),  CE(p, q) = −(1/b) Σ_i Σ_j p_ij log q_ij

MobileCLIP (Vasu et al., "MobileCLIP: Fast Image-Text Models through Multi-Modal Reinforced Training", CVPR 2024,
§3.2; apple/ml-mobileclip ``training/open_clip_v2.patch``: ``DistillClipLoss``) trains on
``L = (1 − λ) · L_CLIP + λ · L_distill`` with an ensemble of K teachers whose distributions are averaged after
the softmax (``--distill-average-after-softmax``), each with its own scale. Both are this one loss: TinyCLIP is
λ = 1 with one teacher and a fixed scale of 50 for teacher and student; MobileCLIP is λ = 0.75 or 1, K = 2 and
a teacher scale of 100 with a learned student scale.

Features are gathered across ranks exactly as ``ClipLoss`` gathers them (``local_loss``/``gather_with_grad``),
so under torchrun each rank's rows see every rank's columns; teacher features are gathered without gradient.
With ``local_loss`` the loss is TinyCLIP's (which requires it); the mean over ranks is the full-batch loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clipforge.train.distributed import gather_features
from clipforge.train.losses import ClipLoss


class AffinityMimickingLoss(ClipLoss):
    """``(1 − λ) · InfoNCE(student) + λ · affinity mimicking`` towards one or several teachers.

    Called as ``loss(image_features, text_features, logit_scale[, logit_bias], teacher_image_features=...,
    teacher_text_features=...)`` with normalised features; the teacher arguments are a tensor [B, D] or a
    sequence of them (an ensemble; widths may differ), and ``teacher_scales`` holds each teacher's
    (exponentiated) logit scale. The student's ``logit_scale`` is whatever the model returns (fixed by the
    objective for TinyCLIP). With λ = 0 it is the CLIP loss and needs no teacher features. ``parts`` keeps the
    last call's terms, detached, for logging.
    """

    def __init__(
        self,
        distill_weight: float,
        teacher_scales: Sequence[float],
        *,
        local_loss: bool = True,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__(local_loss, gather_with_grad)
        self.distill_weight = float(distill_weight)
        self.teacher_scales = [float(scale) for scale in teacher_scales]
        self.parts: dict[str, float] = {}

    def teacher_probabilities(
        self, image_features: Sequence[torch.Tensor], text_features: Sequence[torch.Tensor], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the teachers' image→text and text→image distributions, averaged over teachers,
        computed in ``dtype`` (the student's features' type: stored fp16 embeddings are widened)."""
        if len(image_features) != len(self.teacher_scales) or len(text_features) != len(self.teacher_scales):
            raise ValueError(
                f"{len(self.teacher_scales)} teacher scales but {len(image_features)} image and "
                f"{len(text_features)} text feature sets"
            )
        per_image, per_text = 0.0, 0.0
        with torch.no_grad():
            for images, texts, scale in zip(image_features, text_features, self.teacher_scales):
                images, texts = images.to(dtype), texts.to(dtype)
                all_images, all_texts = gather_features(images, texts, local_loss=True, gather_with_grad=False)
                rows_images, rows_texts = (images, texts) if self.local_loss else (all_images, all_texts)
                per_image = per_image + (scale * rows_images @ all_texts.T).softmax(dim=1)
                per_text = per_text + (scale * rows_texts @ all_images.T).softmax(dim=1)
        count = len(self.teacher_scales)
        return per_image / count, per_text / count

    def forward(  # type: ignore[override]
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        *,
        teacher_image_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        teacher_text_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        student = self.logits(image_features, text_features, logit_scale, logit_bias)
        clip = self.contrastive(*student)
        self.parts = {"loss_clip": float(clip.detach())}
        if self.distill_weight == 0.0:  # the plain CLIP loss: no teacher features needed
            return clip
        if teacher_image_features is None or teacher_text_features is None:
            raise ValueError(f"λ = {self.distill_weight}: the teachers' image and text features are needed")
        teacher = self.teacher_probabilities(
            _as_list(teacher_image_features), _as_list(teacher_text_features), image_features.dtype
        )
        distill = sum(soft_cross_entropy(s, t) for s, t in zip(student, teacher)) / 2
        self.parts["loss_distill"] = float(distill.detach())
        return (1.0 - self.distill_weight) * clip + self.distill_weight * distill


def soft_cross_entropy(logits: torch.Tensor, target_probabilities: torch.Tensor) -> torch.Tensor:
    """``−(1/rows) Σ_ij p_ij log softmax(logits)_ij``: cross-entropy against a soft target, mean over rows."""
    return -(target_probabilities * logits.log_softmax(dim=1)).sum(dim=1).mean()


def _as_list(features: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [features] if isinstance(features, torch.Tensor) else list(features)
