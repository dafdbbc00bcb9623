"""Image–image contrastive fine-tuning for re-identification (CLIP-ReIdent).

Habel, Deuser, Oswald, "CLIP-ReIdent: Contrastive Training for Player Re-Identification", MMSports 2022; official
code KonradHabel/clip_reid (``clipreid/loss.py``, ``clipreid/dataset.py``, ``train.py``).

- Each batch holds every identity at most once (the official ``TrainDataset.shuffle``: no false negatives);
  each identity brings two different images of itself, both mirrored or neither (p 0.5).
- Symmetric InfoNCE between the two sides: ``logits = s · q @ gᵀ`` with a learnable scale ``s`` (initialised to
  1/0.07), ``loss = ½ (CE(logits, i) + CE(logitsᵀ, i))`` with label smoothing 0.1.
- The whole image tower trains; AdamW at lr 4e-5, batch 16 (the official defaults).

Differences: the official code removes the projection (``remove_proj=True``) and decays the rate polynomially
after one warm-up epoch over 4 epochs, in fp16; here the projected embedding is trained (so the tuned checkpoint
embeds images like any clipforge model), with a cosine decay over ``steps`` batches, in fp32 unless ``amp``.
Evaluation (``clipforge eval reid``) ranks without the official k-reciprocal re-ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.adapt.adapter import Adapter
from clipforge.adapt.adapter_file import AdapterRecord, model_fingerprint
from clipforge.adapt.method import (
    AT_LEAST_ONE,
    AT_LEAST_TWO,
    BELOW_ONE,
    NON_NEGATIVE,
    POSITIVE,
    Range,
    settings_dict,
    settings_from,
)
from clipforge.adapt.optim import Schedule, optimise
from clipforge.adapt.recipe_data import identity_images
from clipforge.adapt.tuning import autocast
from clipforge.adapt.weights import trainable_copy, tuned_model
from clipforge.encode import model_device
from clipforge.errors import ConfigError


@dataclass(frozen=True)
class ReidSettings:
    lr: float = 4e-5
    weight_decay: float = 0.0
    batch_size: int = 16
    steps: int = 200
    label_smoothing: float = 0.1
    samples: int = 2400
    amp: bool = False

    RANGES: ClassVar[dict[str, Range]] = {
        "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "steps": AT_LEAST_ONE, "label_smoothing": BELOW_ONE,
        "batch_size": AT_LEAST_TWO,  # identities per batch: InfoNCE over one has nothing to contrast
    }


def symmetric_info_nce(left: torch.Tensor, right: torch.Tensor, scale: torch.Tensor, smoothing: float) -> torch.Tensor:
    """½ (CE(s·l·rᵀ, i) + CE(s·r·lᵀ, i)) of two normalised views [B, D] of B distinct identities."""
    logits = scale * left @ right.T
    targets = torch.arange(len(left), device=left.device)
    return 0.5 * (F.cross_entropy(logits, targets, label_smoothing=smoothing)
                  + F.cross_entropy(logits.T, targets, label_smoothing=smoothing))


def identity_batches(labels: list[int], batch_size: int, steps: int, seed: int) -> list[list[tuple[int, int, bool]]]:
    """``steps`` batches of (row, other row, mirror) pairs: each identity once per batch, two distinct images."""
    by_identity: dict[int, list[int]] = {}
    for row, label in enumerate(labels):
        by_identity.setdefault(label, []).append(row)
    usable = sorted(label for label, rows in by_identity.items() if len(rows) >= 2)
    if len(usable) < 2:
        raise ConfigError(f"reid: {len(usable)} identities with two images or more; at least 2 are needed")
    size = min(batch_size, len(usable))
    generator = torch.Generator().manual_seed(seed)
    batches: list[list[tuple[int, int, bool]]] = []
    while len(batches) < steps:
        order = torch.randperm(len(usable), generator=generator).tolist()
        for start in range(0, len(order) - size + 1, size):
            batch = []
            for position in order[start : start + size]:
                rows = by_identity[usable[position]]
                pick = torch.randperm(len(rows), generator=generator)[:2].tolist()
                batch.append((rows[pick[0]], rows[pick[1]], bool(torch.rand(1, generator=generator) < 0.5)))
            batches.append(batch)
    return batches[:steps]


def fit_reid(model: Any, data: str, settings: dict[str, Any] | None = None, seed: int = 1, progress: bool = False,
             model_source: str | None = None, **data_options: Any) -> Adapter:
    """Fine-tune the image tower on identities of ``data`` (``synthetic:identities`` or labelled images, a class
    per identity); the result is a tuned checkpoint (``Adapter.save``), evaluated with ``clipforge eval reid``.
    ``model_source`` names the model in its provenance (default: its config name)."""
    chosen = settings_from(ReidSettings, settings or {}, "reid")
    images, labels, source = identity_images(data, chosen.samples, **data_options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tuned = trainable_copy(model, "reid")
        loss = train_pairs(tuned, images, labels, chosen, seed, progress)
    record = AdapterRecord(method="reid", tensors={}, settings=settings_dict(chosen), classnames=[], templates=[],
                           base_model=model_fingerprint(model), extra={"final_loss": loss},
                           provenance={"train": source, "images": len(images), "identities": len(set(labels)), "seed": seed})
    return Adapter(record, model=tuned_model(tuned, "reid", model, model_source or str(model.config.name)), source="reid checkpoint")


def train_pairs(tuned: nn.Module, images: list[Any], labels: list[int], settings: ReidSettings, seed: int,
                progress: bool) -> float:
    device = model_device(tuned)
    for parameter in tuned.visual.parameters():
        parameter.requires_grad_(True)
    scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    batches = identity_batches(labels, settings.batch_size, settings.steps, seed)
    pixels = torch.stack([tuned.preprocess(image) for image in images])
    schedule = Schedule("adamw", settings.lr, settings.steps, weight_decay=settings.weight_decay)

    def side(batch: list[tuple[int, int, bool]], which: int) -> torch.Tensor:
        views = torch.stack([pixels[pair[which]].flip(-1) if pair[2] else pixels[pair[which]] for pair in batch])
        with autocast(tuned, settings.amp):
            return tuned(views.to(device))[0].float()

    def loss_at(step: int) -> torch.Tensor:
        batch = batches[step]
        return symmetric_info_nce(side(batch, 0), side(batch, 1), scale.exp(), settings.label_smoothing)

    tuned.train()
    try:
        return optimise([*tuned.visual.parameters(), scale], schedule, loss_at, progress=progress, description="CLIP-ReIdent")
    finally:
        tuned.eval()
