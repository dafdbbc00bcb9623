"""The optimisation loop every trained method shares: an optimiser, a cosine schedule, an optional constant warm-up.

The schedules are those of the official code, stepped per iteration: Dassl's ``cosine`` with
``WARMUP_TYPE: constant`` (CoOp, MaPLe, CLAP: the first ``warmup`` steps at ``warmup_lr``) and
``CosineAnnealingLR(eta_min)`` over all iterations (Tip-Adapter-F, CLIP-LoRA, CLIP-SVD).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from clipforge._util.progress import progress_bar
from clipforge.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    """``optimizer`` ("sgd": momentum 0.9 as Dassl's default, or "adamw"), its rate and decay, and the cosine."""

    optimizer: str
    lr: float
    steps: int
    weight_decay: float = 0.0
    warmup: int = 0
    warmup_lr: float = 1e-5
    eta_min: float = 0.0
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer: {self.optimizer!r} is not 'sgd' or 'adamw'")
        if self.steps < 1 or self.lr <= 0:
            raise ConfigError(f"schedule: {self.steps} steps at lr {self.lr}: need at least one step and lr > 0")

    def rate(self, step: int) -> float:
        if step < self.warmup:
            return self.warmup_lr
        done = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.eta_min + (self.lr - self.eta_min) * (1 + math.cos(math.pi * done)) / 2

    def make(self, parameters: Iterable[torch.nn.Parameter] | list[dict]) -> torch.optim.Optimizer:
        parameters = list(parameters)
        if self.optimizer == "sgd":
            return torch.optim.SGD(parameters, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay, eps=self.eps)


def optimise(
    parameters: Iterable[torch.nn.Parameter],
    schedule: Schedule,
    loss_at: Callable[[int], torch.Tensor],
    *,
    progress: bool = False,
    description: str = "training",
    after_step: Callable[[int], None] | None = None,
) -> float:
    """Run ``schedule.steps`` steps of ``loss_at(step).backward()`` and the optimiser; the last loss.

    ``parameters`` are parameters, or groups ``{"params": [...], "lr_scale": s}`` whose rate is ``s`` times the
    schedule's (a head trained faster than the backbone it sits on)."""
    items = list(parameters)
    groups = [{"params": [p for p in items if not isinstance(p, dict)], "lr_scale": 1.0}]
    groups += [{**item, "params": list(item["params"])} for item in items if isinstance(item, dict)]
    for group in groups:
        group["params"] = [p for p in group["params"] if p.requires_grad]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ConfigError(f"{description}: nothing to train (no parameter requires a gradient)")
    optimizer = schedule.make(groups)
    loss = torch.zeros(())
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(description, total=schedule.steps, unit="step")
        for step in range(schedule.steps):
            for group in optimizer.param_groups:
                group["lr"] = schedule.rate(step) * group.get("lr_scale", 1.0)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_at(step)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
            bar.advance(task)
    return float(loss.detach())


def epoch_batches(count: int, batch_size: int, epochs: int, seed: int, drop_last: bool = False) -> list[torch.Tensor]:
    """Row indices of every batch of ``epochs`` shuffled passes over ``count`` rows (Dassl's loader: the last
    partial batch is dropped when ``drop_last`` and the set holds at least one full batch)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        stop = count - count % batch_size if drop_last and count >= batch_size else count
        batches.extend(order[start : min(start + batch_size, stop)] for start in range(0, stop, batch_size))
    return batches
