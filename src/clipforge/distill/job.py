"""A distillation job as data: the student, the stages, inheritance and loss settings, and each stage's schedule."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from clipforge.distill.objective import DistillSettings
from clipforge.distill.plan import StudentSpec
from clipforge.errors import ConfigError
from clipforge.train.config import TrainConfig


@dataclass(frozen=True)
class AutoSettings:
    """Automatic inheritance (``clipforge.distill.auto``): how long and how fast the masks learn."""

    mask_share: float = 0.3  # of each stage's steps spent learning masks (TinyCLIP: --prune-step)
    warmup_share: float = 0.25  # of the mask steps over which the target size ramps down (TinyCLIP: 1000 of 3000+)
    mask_lr: float = 0.1  # Adam step on log α (TinyCLIP: 0.02 over thousands of steps)
    lagrangian_lr: float = 0.1  # gradient ascent on λ1, λ2

    def __post_init__(self) -> None:
        for name in ("mask_share", "warmup_share"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"auto.{name}: {getattr(self, name)} is outside (0, 1)")


@dataclass(frozen=True)
class DistillJob:
    """Everything a distillation run depends on besides the training config."""

    student: StudentSpec
    stages: list[float] = field(default_factory=list)  # shares of the teacher; empty for a student config
    init: str = "inherit"  # inherit | scratch (baselines: the student's architecture, random weights)
    layers: str = "uniform"  # uniform | first
    order: str = "importance"  # importance | leading
    settings: DistillSettings = field(default_factory=DistillSettings)
    auto: AutoSettings = field(default_factory=AutoSettings)


def split_steps(total: int, parts: int) -> list[int]:
    """``total`` steps in ``parts`` near-equal stages."""
    if total < parts:
        raise ConfigError(f"schedule.steps: {total} steps cannot be split into {parts} stages")
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def stage_config(config: TrainConfig, run_dir: Path, steps: int) -> TrainConfig:
    """``config`` for one stage: its own run directory and steps, warm-up and cool-down scaled with the steps."""
    stage = copy.deepcopy(config)
    share = steps / config.schedule.steps
    stage.run.dir = str(run_dir)
    stage.schedule.steps = steps
    stage.schedule.warmup = min(round(config.schedule.warmup * share), steps - 1)
    if stage.schedule.kind == "const-cooldown":
        stage.schedule.cooldown = max(1, min(round(config.schedule.cooldown * share), steps - stage.schedule.warmup))
    return stage.validate()
