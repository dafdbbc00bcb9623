"""Distillation as a training objective: the teacher's affinities as targets, online or stored with the data.

``Distillation`` plugs into the one trainer (``clipforge.train.trainer.train(config, objective=...)``), so
distillation gets exact resume, torchrun, the progress bar and periodic evaluation as they are. Its loss is
``AffinityMimickingLoss``: ``(1 − λ)·CLIP + λ·affinity mimicking``; with λ = 0 a run is bitwise the plain
CLIP recipe (tested). The targets come either from teachers run on each batch under ``no_grad`` (TinyCLIP:
teacher and student see the same pixels and tokens) or from the batch's stored embeddings (MobileCLIP's
reinforced data, where no teacher runs). TinyCLIP writes a fixed temperature into both models
(``--logit-scale 50``); ``student_scale`` does the same for the student, None leaves its scale learned
(MobileCLIP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clipforge.config import ModelConfig
from clipforge.data.sources import CaptionSource
from clipforge.distill.losses import AffinityMimickingLoss
from clipforge.errors import ConfigError
from clipforge.models.clip import CLIP
from clipforge.preprocess.transforms import PreprocessConfig
from clipforge.train.config import TrainConfig
from clipforge.train.distributed import rank_and_world_size
from clipforge.train.objective import Objective
from clipforge.train.step import AMP_DTYPES, resolve_amp

TINYCLIP_LOGIT_SCALE = 50.0  # TinyCLIP's scripts: --logit-scale 50 (τ = 0.02) for teacher and student


@dataclass(frozen=True)
class DistillSettings:
    """λ and the temperatures: ``teacher_scale`` None uses each teacher's own (learned) scale."""

    distill_weight: float = 1.0
    teacher_scale: float | None = TINYCLIP_LOGIT_SCALE
    student_scale: float | None = TINYCLIP_LOGIT_SCALE

    @property
    def plain_clip(self) -> bool:
        """λ = 0 with a learned student scale: the plain CLIP recipe, no distillation objective at all."""
        return self.distill_weight == 0 and self.student_scale is None

    def __post_init__(self) -> None:
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ConfigError(f"distill_weight: {self.distill_weight} is outside [0, 1] (λ of (1 − λ)·CLIP + λ·distillation)")
        for name in ("teacher_scale", "student_scale"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 100.0:
                raise ConfigError(f"{name}: {value} must be in (0, 100] (an exponentiated logit scale, 1/τ)")


class Distillation(Objective):
    """Affinity mimicking towards ``teachers`` run online, or towards the embeddings a reinforced ``source``
    hands over with each batch (``extras`` ``teacher_image`` and ``teacher_text``, split by ``teacher_dims``).
    With λ = 0 neither is needed (the CLIP loss with the student's scale fixed); teachers given then never run."""

    def __init__(
        self,
        config: TrainConfig,
        settings: DistillSettings,
        *,
        teachers: Sequence[CLIP] = (),
        source: CaptionSource | None = None,
        teacher_dims: Sequence[int] = (),
        stored_scales: Sequence[float] = (),
    ) -> None:
        super().__init__(config.loss)
        if teachers and source is not None:
            raise ConfigError("distillation takes teachers to run or reinforced data, not both")
        if settings.distill_weight > 0 and not teachers and source is None:
            raise ConfigError("distillation needs teachers to run or reinforced data")
        check_loss(config)
        self.settings = settings
        self.teachers = list(teachers)
        self.reinforced = source
        self.teacher_dims = list(teacher_dims)
        own_scales = [float(t.logit_scale.detach().exp()) for t in self.teachers] or [float(s) for s in stored_scales]
        self.teacher_scales = [settings.teacher_scale] * len(own_scales) if settings.teacher_scale else own_scales
        self.amp = config.precision.amp
        self._loss = AffinityMimickingLoss(
            settings.distill_weight,
            self.teacher_scales,
            local_loss=config.loss.local_loss,
            gather_with_grad=config.loss.gather_with_grad,
        )

    def loss_fn(self) -> nn.Module:
        return self._loss

    def source(self, config: TrainConfig) -> CaptionSource | None:
        return self.reinforced

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        for teacher in self.teachers:
            check_teacher(teacher, model.config, model.preprocess_cfg)
            teacher.to(device).eval().requires_grad_(False)
        self.device = device
        self.amp_dtype = AMP_DTYPES[resolve_amp(self.amp, device)]
        if self.settings.student_scale is not None:
            model.logit_scale.data.fill_(math.log(self.settings.student_scale))
            model.logit_scale.requires_grad_(False)

    def targets(self, images: torch.Tensor, texts: torch.Tensor, extras: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        if self.settings.distill_weight == 0.0:  # λ = 0: the CLIP loss alone, no teacher runs
            return {}
        if self.reinforced is not None:
            if extras is None:
                raise ConfigError("reinforced training: the data source handed over no stored embeddings")
            return {
                "teacher_image_features": extras["teacher_image"].to(self.device).split(self.teacher_dims, dim=1),
                "teacher_text_features": extras["teacher_text"].to(self.device).split(self.teacher_dims, dim=1),
            }
        images, texts = images.to(self.device), texts.to(self.device)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with torch.no_grad(), autocast:
            outputs = [teacher(images, texts) for teacher in self.teachers]
        return {
            "teacher_image_features": [output[0].float() for output in outputs],
            "teacher_text_features": [output[1].float() for output in outputs],
        }

    def metrics(self) -> dict[str, float]:
        """The last step's two loss terms, averaged over ranks (every rank logs together, so this may reduce)."""
        names, values = list(self._loss.parts), torch.tensor(list(self._loss.parts.values()), dtype=torch.float64)
        _, world_size = rank_and_world_size()
        if world_size > 1 and names:
            import torch.distributed as dist

            dist.all_reduce(values)
            values /= world_size
        return {name: round(float(value), 6) for name, value in zip(names, values)}


def check_loss(config: TrainConfig) -> None:
    if config.loss.kind != "clip":
        raise ConfigError(f"loss.kind: distillation builds on the CLIP loss, not {config.loss.kind!r}")


def check_teacher(teacher: CLIP, student: ModelConfig, preprocess: PreprocessConfig) -> None:
    """An online teacher sees the student's pixels and tokens (``student``'s config, ``preprocess``-ed): same image
    size and normalisation, and a context at least as long as the student's tokens."""
    pairs = [
        ("image size", teacher.config.vision.image_size, student.vision.image_size),
        ("preprocessing mean", teacher.preprocess_cfg.mean, preprocess.mean),
        ("preprocessing std", teacher.preprocess_cfg.std, preprocess.std),
        ("vocabulary", teacher.config.text.vocab_size, student.text.vocab_size),
    ]
    for name, theirs, ours in pairs:
        if theirs != ours:
            raise ConfigError(
                f"teacher {name} {theirs!r} differs from the student's {ours!r}; an online teacher sees the student's "
                "batch (reinforce the data with `clipforge data reinforce` to distil across preprocessings)"
            )
    if teacher.config.text.context_length < student.text.context_length:
        raise ConfigError(
            f"teacher context length {teacher.config.text.context_length} is shorter than the student's "
            f"{student.text.context_length}"
        )
