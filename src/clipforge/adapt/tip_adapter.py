"""Tip-Adapter and Tip-Adapter-F: a key-value cache of the few-shot features added to the zero-shot logits.

Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification", ECCV 2022; official
code gaopengcuhk/Tip-Adapter (``main.py``, ``utils.py``: ``build_cache_model``, ``search_hp``).

    keys   = normalise(mean of the features of ``augment_epoch`` augmented views)   [NK, D]
    values = one_hot(labels)                                                         [NK, C]
    A      = exp(-β (1 - f keysᵀ))                (the affinity, f the normalised test feature)
    logits = 100 · f Tᵀ + α · A values

α and β are searched on the validation shots over Tip-Adapter's grid (``search_scale`` [7, 3], ``search_step``
[200, 20]: ImageNet's), starting from α = 1, β = 5.5 (the paper's ImageNet ablation), which are kept when there
are no validation shots. Tip-Adapter-F makes the keys a linear layer initialised with them and trains it with
CE on those logits (AdamW lr 1e-3, eps 1e-4, cosine, batch 256, 20 epochs, α and β fixed at their initial
values), then searches α and β again.

Differences from the official code: the keys average the L2-normalised views (``clipforge.encode`` returns
normalised features) rather than the raw ones; Tip-Adapter-F trains on the cached augmented views (epoch e
reads view e mod ``augment_epoch``) instead of freshly augmented images, and keeps the last epoch (the
official script keeps the epoch with the best *test* accuracy); the validation set is CoOp's few-shot one
(min(K, 4) per class) rather than the full validation split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from clipforge.adapt.features import Augmentation
from clipforge.adapt.method import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    FitInputs,
    Fitted,
    Head,
    Method,
    Range,
    Saved,
)
from clipforge.adapt.optim import Schedule, epoch_batches, optimise
from clipforge.adapt.selection import clip_logits, linear_grid, validation

SEARCH_BLOCK = 1 << 22  # logits scored at once in the α-β search


@dataclass(frozen=True)
class TipAdapterSettings:
    augment_epoch: int = 10
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True
    init_alpha: float = 1.0
    init_beta: float = 5.5
    search_scale: tuple[float, float] = (7.0, 3.0)  # (β, α)
    search_step: tuple[int, int] = (200, 20)
    # Tip-Adapter-F only
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 256

    RANGES: ClassVar[dict[str, Range]] = {
        "augment_epoch": AT_LEAST_ONE, "init_alpha": NON_NEGATIVE, "init_beta": NON_NEGATIVE, "search_scale": POSITIVE,
        "search_step": AT_LEAST_ONE, "epochs": AT_LEAST_ONE, "lr": POSITIVE, "batch_size": AT_LEAST_ONE,
    }


class TipAdapterHead(Head):
    def __init__(self, keys: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, alpha: float, beta: float) -> None:
        super().__init__()
        self.register_buffer("keys", keys.float())
        self.register_buffer("values", F.one_hot(labels.long(), len(text)).float())
        self.register_buffer("text", text.float())
        self.alpha, self.beta = float(alpha), float(beta)

    def affinity(self, features: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """``exp(-β (1 - f keysᵀ))`` [N, NK]."""
        return torch.exp(-self.beta * (1 - features @ (self.keys if keys is None else keys).T))

    def cache_logits(self, features: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        return self.affinity(features, keys) @ self.values

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return clip_logits(features, self.text) + self.alpha * self.cache_logits(features)


def _cache_keys(inputs: FitInputs, settings: TipAdapterSettings) -> torch.Tensor:
    views = inputs.cache.augmented(inputs.shots.train, settings.augment_epoch, _augmentation(settings))
    return F.normalize(views.mean(dim=0), dim=-1)


def _augmentation(settings: TipAdapterSettings) -> Augmentation:
    return Augmentation(settings.crop_scale, settings.flip)


def _search(head: TipAdapterHead, inputs: FitInputs, settings: TipAdapterSettings) -> dict[str, float]:
    """Tip-Adapter's ``search_hp``: every (β, α) of the grid on the validation shots, β in the outer loop and the
    first best kept; the head takes the best pair. The grid is scored in blocks of β values at once."""
    found = validation(inputs)
    if found is None:
        return {"alpha": head.alpha, "beta": head.beta, "val_acc": float("nan")}
    features, labels = found
    zero_shot, distance = clip_logits(features, head.text), 1 - features @ head.keys.T
    betas = torch.tensor(linear_grid(settings.search_scale[0], settings.search_step[0]))
    alphas = torch.tensor(linear_grid(settings.search_scale[1], settings.search_step[1]))
    block = max(1, SEARCH_BLOCK // (len(alphas) * zero_shot.numel()))
    scores = []
    for beta in betas.split(block):
        cache = torch.exp(-beta[:, None, None] * distance) @ head.values  # [b, N, C]
        logits = zero_shot + alphas[None, :, None, None] * cache[:, None]  # [b, a, N, C]
        scores.append((logits.argmax(dim=-1) == labels).float().mean(dim=-1))
    table = torch.cat(scores)
    best = int(table.flatten().argmax())  # the first maximum in (β, α) order
    head.beta, head.alpha = float(betas[best // len(alphas)]), float(alphas[best % len(alphas)])
    return {"alpha": head.alpha, "beta": head.beta, "val_acc": float(table.flatten()[best])}


def fit_tip_adapter(inputs: FitInputs, settings: TipAdapterSettings) -> Fitted:
    labels = torch.as_tensor(inputs.shots.train.labels)
    head = TipAdapterHead(_cache_keys(inputs, settings), labels, inputs.text, settings.init_alpha, settings.init_beta)
    extra = _search(head, inputs, settings)
    return Fitted({"keys": head.keys, "labels": labels}, extra)


def fit_tip_adapter_f(inputs: FitInputs, settings: TipAdapterSettings) -> Fitted:
    labels = torch.as_tensor(inputs.shots.train.labels)
    head = TipAdapterHead(_cache_keys(inputs, settings), labels, inputs.text, settings.init_alpha, settings.init_beta)
    views = inputs.cache.augmented(inputs.shots.train, settings.augment_epoch, _augmentation(settings))
    keys = torch.nn.Parameter(head.keys.clone())
    batches = epoch_batches(len(labels), settings.batch_size, settings.epochs, inputs.shots.seed)
    per_epoch = len(batches) // settings.epochs

    def loss_at(step: int) -> torch.Tensor:
        rows = batches[step]
        features = views[(step // per_epoch) % len(views)][rows]
        logits = clip_logits(features, head.text) + head.alpha * head.cache_logits(features, keys)
        return F.cross_entropy(logits, labels[rows])

    schedule = Schedule("adamw", settings.lr, len(batches), eps=1e-4)
    optimise([keys], schedule, loss_at, progress=inputs.progress, description="Tip-Adapter-F")
    head.keys = keys.detach()
    extra = _search(head, inputs, settings)
    return Fitted({"keys": head.keys, "labels": labels}, extra)


def rebuild(saved: Saved) -> Head:
    return TipAdapterHead(saved.tensors["keys"], saved.tensors["labels"], saved.text, saved.extra["alpha"], saved.extra["beta"])


TIP_ADAPTER = Method("tip-adapter", "training-free", TipAdapterSettings, fit_tip_adapter, rebuild,
                     "cache of few-shot features added to zero-shot (Zhang et al., ECCV 2022)", uses_validation=True)
TIP_ADAPTER_F = Method("tip-adapter-f", "head", TipAdapterSettings, fit_tip_adapter_f, rebuild,
                       "Tip-Adapter with fine-tuned cache keys (Zhang et al., ECCV 2022)", uses_validation=True)
