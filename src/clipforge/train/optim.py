"""AdamW with weight decay on ≥2-D weights only, and open_clip's learning-rate schedules: linear warmup,
then cosine decay, a constant rate, or a constant rate with a final cool-down."""

from __future__ import annotations

import math

import torch
from torch import nn

from clipforge.train.config import OptimizerSection, ScheduleSection


def build_optimizer(model: nn.Module, cfg: OptimizerSection) -> torch.optim.AdamW:
    """Matrices and embeddings decay; gains, biases, class token and logit scale/bias do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def learning_rate(step: int, base_lr: float, cfg: ScheduleSection) -> float:
    """Linear warmup to ``base_lr`` over ``warmup`` steps, then by ``cfg.kind``:

    - ``cosine``: cosine decay to 0 (open_clip ``cosine_lr``);
    - ``const``: ``base_lr`` (open_clip ``const_lr``);
    - ``const-cooldown``: ``base_lr`` until the last ``cooldown`` steps, which decay it to ``cooldown_end_lr``
      as ``(1 − t)^cooldown_power`` (open_clip ``const_lr_cooldown``; the warmup-stable-decay schedule of
      Hägele et al., "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations", 2024).
    """
    if step < cfg.warmup:
        return base_lr * (step + 1) / cfg.warmup
    if cfg.kind == "const":
        return base_lr
    if cfg.kind == "const-cooldown":
        cooldown_start = cfg.steps - cfg.cooldown
        if step < cooldown_start:
            return base_lr
        decay = (1 - (step - cooldown_start) / cfg.cooldown) ** cfg.cooldown_power
        return decay * (base_lr - cfg.cooldown_end_lr) + cfg.cooldown_end_lr
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled rate for every group but those marked ``fixed_lr`` (an objective's own state, e.g. masks)."""
    for group in optimizer.param_groups:
        if not group.get("fixed_lr", False):
            group["lr"] = lr
