"""Pieces the feature-space methods share: zero-shot logits, accuracy, and hyper-parameter choice on validation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch

from clipforge.adapt.method import FitInputs, Head

CLIP_SCALE = 100.0  # exp(logit_scale) of OpenAI's CLIP, the scale Tip-Adapter, GDA and CLIP_benchmark use
Choice = TypeVar("Choice")


def clip_logits(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Zero-shot logits ``100 · f Tᵀ`` of normalised features [N, D] against the class embeddings [C, D]."""
    return CLIP_SCALE * features @ text.T


class ZeroShotHead(Head):
    """``100 · f Tᵀ``: the head of weight methods (the tuned model's own zero-shot head) and of prompt learners
    (T from the learned prompts)."""

    def __init__(self, text: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("text", text.float().cpu())

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return clip_logits(features, self.text)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).float().mean().item()


def best_on_validation(
    choices: Iterable[Choice], logits_of: Callable[[Choice], torch.Tensor], labels: torch.Tensor
) -> tuple[Choice, float]:
    """The choice whose logits score the best validation accuracy (the first one on ties) and that accuracy."""
    best, best_accuracy = None, -1.0
    for choice in choices:
        score = accuracy(logits_of(choice), labels)
        if score > best_accuracy:
            best, best_accuracy = choice, score
    return best, best_accuracy  # type: ignore[return-value]


def validation(inputs: FitInputs) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Plain features and labels of the validation shots, or None when the fit drew none."""
    val = inputs.shots.val
    if val is None:
        return None
    return inputs.cache.plain(val), torch.as_tensor(val.labels)


def linear_grid(top: float, steps: int, bottom: float = 0.1) -> Sequence[float]:
    """Tip-Adapter's search grid ``[i · (top - bottom) / steps + bottom for i in range(steps)]``."""
    return [i * (top - bottom) / steps + bottom for i in range(steps)]
