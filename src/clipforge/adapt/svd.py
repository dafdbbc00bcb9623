"""CLIP-SVD: every linear layer of both towers as ``U diag(s) Vᵀ``, and only the singular values ``s`` trained.

"Singular Value Few-shot Adaptation of Vision-Language Models" (Koleilat, Rivaz & Xiao, 2025); official code
HealthX-Lab/CLIP-SVD (``svf_utils/svf_torch.py``, ``svf_utils/utils.py``, ``train.py``, ``configs/few_shot``).

Each ``nn.Linear`` inside the two transformers (q, k, v after ``split_attention``, the attention output and
both MLP layers) becomes ``SingularValueLinear``: ``x ↦ U ((Vᵀ x) ⊙ s) + b`` at full rank from ``torch.linalg.svd``,
U, V and b frozen, so the model reproduces its outputs before training (to rounding). AdamW lr 5e-4, weight
decay 0.01, cosine to 1e-6 over ``200 × K`` iterations of 32 images (RandomResizedCrop(scale 0.08–1) and flip),
CE on ``exp(logit_scale) · cos`` (the model's own scale, as the official ``main.py`` takes for
BiomedCLIP; its 100 for OpenAI CLIP is that model's ``exp(logit_scale)``). The trained factors are multiplied
back and the attention fused again: the result is a plain clipforge checkpoint.

Differences: the SVD is computed in float64 (the official code calls ``torch.svd`` in float32); class embeddings
average the dataset's templates (one template: the official code's single prompt); fp32 unless ``amp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.adapt.linear_form import fuse_attention, split_attention
from clipforge.adapt.method import FitInputs, Fitted, Method, Range
from clipforge.adapt.weights import (
    TRAINING_RANGES,
    train_weights,
    trainable_copy,
    tuned_model,
    tuned_text,
)


@dataclass(frozen=True)
class SvdSettings:
    lr: float = 5e-4
    weight_decay: float = 0.01
    iterations_per_shot: int = 200
    batch_size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    amp: bool = False

    RANGES: ClassVar[dict[str, Range]] = TRAINING_RANGES


class SingularValueLinear(nn.Module):
    """``U diag(s) Vᵀ x + b`` with only ``s`` trainable (CLIP-SVD's ``fc_U(fc_V(x) * s) + bias``)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        dtype = linear.weight.dtype
        self.register_buffer("u", u.to(dtype))
        self.register_buffer("vh", vh.to(dtype))
        self.s = nn.Parameter(s.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.vh) * self.s, self.u, self.bias)

    def as_linear(self) -> nn.Linear:
        linear = nn.Linear(self.vh.shape[1], self.u.shape[0], bias=self.bias is not None, device=self.u.device)
        with torch.no_grad():
            linear.weight.copy_((self.u.double() * self.s.double()) @ self.vh.double())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def add_singular_values(model: nn.Module) -> nn.Module:
    """``model`` (in place) with split attention and every linear of both transformers as ``SingularValueLinear``."""
    split_attention(model)
    for tower in (model.visual.transformer, model.transformer):
        for parent in list(tower.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, SingularValueLinear(child))
    return model


def _as_linear(module: nn.Module) -> nn.Linear:
    return module.as_linear() if isinstance(module, SingularValueLinear) else module


def fit_svd(inputs: FitInputs, settings: SvdSettings) -> Fitted:
    tuned = add_singular_values(trainable_copy(inputs.model, "clip-svd"))
    parameters = [module.s for module in tuned.modules() if isinstance(module, SingularValueLinear)]
    loss, steps = train_weights(inputs, tuned, parameters, settings, tuned_text(tuned, inputs), "CLIP-SVD", eta_min=1e-6)
    fuse_attention(tuned, _as_linear)
    extra = {"final_loss": loss, "steps": steps, "trained_values": sum(p.numel() for p in parameters)}
    return Fitted({}, extra, model=tuned_model(tuned, "clip-svd", inputs.model, inputs.model_source))


SVD = Method("clip-svd", "weights", SvdSettings, fit_svd, None,
             "singular values of every linear layer of both towers (Koleilat et al., 2025)")
