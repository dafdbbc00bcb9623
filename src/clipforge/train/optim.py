"""AdamW with weight decay on ≥2-D weights only, and open_clip's warmup + cosine learning-rate schedule."""

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
    """Linear warmup to ``base_lr`` over ``warmup`` steps, then cosine decay to 0 (or constant)."""
    if step < cfg.warmup:
        return base_lr * (step + 1) / cfg.warmup
    if cfg.kind == "const":
        return base_lr
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
