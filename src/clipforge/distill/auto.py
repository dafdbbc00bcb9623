"""Automatic inheritance: learn which channels and neurons to keep under a size target, then fuse them away.

TinyCLIP (Wu et al., ICCV 2023, §3.2; microsoft/Cream ``TinyCLIP/src/training/train.py``, ``l0module.py``): the
masked model (a copy of the previous stage's) is distilled while a Lagrangian drives its expected size to the
target, ``λ1·max(0, t − ŝ) + λ2·max(0, t − ŝ)²`` on expected sparsity ŝ against target sparsity t, with t ramped
linearly from 0 over the first part of the run (``--sparsity-warmup``), λ1 and λ2 (initialised at 10) trained by
gradient *ascent* and log α by descent. At the prune step the masks are fused: the structures with the
largest log α are kept, in the expected numbers, and the masks are dropped; distillation then continues on the
smaller, ordinary model (``clipforge.distill.runner``).

What differs: the fused model must be an ordinary config, so each tower keeps one width and one MLP width for
every block (the expected numbers, averaged over blocks and rounded; the width the one nearest the expected
number that splits into whole heads, at most the teacher's heads of at most its head width); and mask and
multiplier learning rates are settings (TinyCLIP's 0.02 suits its 3,000–8,000-step mask phases; short runs
need larger steps). The target is R × the teacher's parameters. It is reached only by a long enough mask
phase: log α starts at log 100 (a gate open with probability 0.998) and moves at most about ``mask_lr`` per
step, against the distillation loss, while λ grows by about ``lagrangian_lr`` per step; the penalty being
one-sided, the masks may then overshoot it (docs/distill.md has measurements).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from clipforge.config import ModelConfig
from clipforge.distill.inherit import (
    TowerSelection,
    block_tensors,
    count_parameters,
    head_dim_importance,
    head_importance,
    inherit,
    tower_shapes,
)
from clipforge.distill.job import DistillJob, stage_config
from clipforge.distill.masks import StructureMasks, open_probability
from clipforge.distill.objective import Distillation
from clipforge.errors import ConfigError
from clipforge.io.checkpoint import write_checkpoint
from clipforge.models.clip import CLIP
from clipforge.train.config import TrainConfig
from clipforge.train.distributed import rank_and_world_size
from clipforge.train.trainer import TrainResult, train

if TYPE_CHECKING:
    from clipforge.distill.reinforced import ReinforcedData

LAGRANGIAN_INIT = 10.0  # TinyCLIP/CoFi: lambda_1 = lambda_2 = 10
SIZE_TOLERANCE = 0.02  # a fused student further than this (relative) from its target size has missed it


class SizeLagrangian(nn.Module):
    """``λ1·max(0, t − ŝ) + λ2·max(0, t − ŝ)²`` with t ramped from 0 to ``target_sparsity`` over ``warmup`` steps."""

    def __init__(self, masks: StructureMasks, full_size: int, target_size: int, warmup: int) -> None:
        super().__init__()
        self.gated = [masks]  # in a list: the masks are the objective's, not this module's
        self.full_size, self.warmup = full_size, warmup
        self.target_sparsity = 1.0 - target_size / full_size
        self.lambdas = nn.Parameter(torch.full((2,), LAGRANGIAN_INIT))
        self.lambdas.register_hook(lambda grad: -grad)  # ascent: the multipliers maximise the penalty
        self.step = 0

    def forward(self) -> torch.Tensor:
        target = self.target_sparsity * min(1.0, (self.step + 1) / max(1, self.warmup))
        shortfall = torch.clamp(target - (1.0 - self.gated[0].expected_size() / self.full_size), min=0.0)
        return self.lambdas[0] * shortfall + self.lambdas[1] * shortfall**2


class _PenalisedLoss(nn.Module):
    def __init__(self, base: nn.Module, penalty: SizeLagrangian) -> None:
        super().__init__()
        self.base, self.penalty = base, penalty

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base(*args, **kwargs) + self.penalty()


class AutoInheritance(Distillation):
    """Distillation of a masked copy of the previous model while the size Lagrangian drives its masks."""

    def __init__(self, config: TrainConfig, job: DistillJob, target_size: int, full_config: ModelConfig, **distillation: Any) -> None:
        super().__init__(config, job.settings, **distillation)
        check_auto(config)
        self.auto = job.auto
        self.masks = StructureMasks(full_config)
        warmup = round(config.schedule.steps * job.auto.warmup_share)
        self.lagrangian = SizeLagrangian(self.masks, count_parameters(full_config), target_size, warmup)
        self._penalised = _PenalisedLoss(self._loss, self.lagrangian)

    def loss_fn(self) -> nn.Module:
        return self._penalised

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        super().prepare(model, device)
        self.masks.to(device)
        self.lagrangian.to(device)
        self.masks.attach(model)
        _, world_size = rank_and_world_size()
        if world_size > 1:  # the masks live outside DDP's model: average their gradients across ranks
            import torch.distributed as dist

            for parameter in [*self.masks.parameters(), self.lagrangian.lambdas]:
                parameter.register_hook(lambda grad: _all_reduce_mean(grad, dist, world_size))

    def param_groups(self) -> list[dict[str, Any]]:
        return [
            {"params": list(self.masks.parameters()), "lr": self.auto.mask_lr, "weight_decay": 0.0, "fixed_lr": True},
            {"params": [self.lagrangian.lambdas], "lr": self.auto.lagrangian_lr, "weight_decay": 0.0, "fixed_lr": True},
        ]

    def begin_step(self, step: int) -> None:
        self.masks.clamp()
        self.lagrangian.step = step
        self.masks.resample()

    def metrics(self) -> dict[str, float]:
        with torch.no_grad():
            size, penalty = float(self.masks.expected_size()), float(self.lagrangian())
        return {**super().metrics(), "expected_params": round(size), "lagrangian": round(penalty, 6)}

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks.state_dict(), "lagrangian": self.lagrangian.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks.load_state_dict(state["masks"])
        self.lagrangian.load_state_dict(state["lagrangian"])


def check_auto(config: TrainConfig) -> None:
    if config.schedule.accum_freq != 1:
        raise ConfigError("schedule.accum_freq: automatic inheritance samples one mask per step; use 1")


def mask_phase(stage: TrainConfig, job: DistillJob) -> TrainConfig:
    """The mask-learning run of a stage: its first ``mask_share`` of steps, in ``<stage>/masks``."""
    steps = max(1, round(stage.schedule.steps * job.auto.mask_share))
    return stage_config(stage, Path(stage.run.dir) / "masks", steps)


def _all_reduce_mean(grad: torch.Tensor, dist: Any, world_size: int) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / world_size


def whole_heads(expected: float, heads: int, head_dim: int) -> tuple[int, int]:
    """(width, heads): the width nearest ``expected`` made of at most ``heads`` heads of at most ``head_dim``
    channels each, and the fewest heads that make it."""
    fewest = {count * dim: count for count in range(heads, 0, -1) for dim in range(1, head_dim + 1)}
    width = min(fewest, key=lambda candidate: (abs(candidate - expected), candidate))
    return width, fewest[width]


def fused_config(config: ModelConfig, masks: StructureMasks) -> ModelConfig:
    """The ordinary config the masks fuse into: per tower the expected width (in whole heads, see ``whole_heads``)
    and the blocks' mean expected MLP width."""
    shapes = tower_shapes(config)
    towers = {}
    for tower, shape in shapes.items():
        expected = float(open_probability(masks.width_log_alpha[tower].detach()).sum())
        width, heads = whole_heads(expected, shape.heads, shape.head_dim)
        neurons = max(1, round(float(open_probability(masks.neuron_log_alpha[tower].detach()).sum(1).mean())))
        towers[tower] = (width, heads, (neurons + 0.5) / width)  # int(width · ratio) == neurons
    (v_width, v_heads, v_ratio), (t_width, t_heads, t_ratio) = towers["vision"], towers["text"]
    return dataclasses.replace(
        config,
        vision=dataclasses.replace(config.vision, width=v_width, head_width=v_width // v_heads, mlp_ratio=v_ratio),
        text=dataclasses.replace(config.text, width=t_width, heads=t_heads, mlp_ratio=t_ratio),
        name=None,
    )


def fused_selection(model: CLIP, masks: StructureMasks, student: ModelConfig) -> dict[str, TowerSelection]:
    """Channels and neurons with the largest log α; heads (and head dimensions) by manual inheritance's importance."""
    state = {key: value.detach().float().cpu() for key, value in model.state_dict().items()}
    teacher_shapes, student_shapes = tower_shapes(model.config), tower_shapes(student)
    chosen = {}
    for tower, shape in teacher_shapes.items():
        small = student_shapes[tower]
        width_scores = masks.width_log_alpha[tower].detach().cpu()
        neuron_scores = masks.neuron_log_alpha[tower].detach().cpu()
        heads, dims = [], []
        for layer in range(shape.layers):
            block = block_tensors(state, shape, layer)
            kept = head_importance(block, shape).topk(small.heads).indices.sort().values
            heads.append(kept)
            dims.append(torch.stack([row.topk(small.head_dim).indices.sort().values for row in head_dim_importance(block, shape)[kept]]))
        chosen[tower] = TowerSelection(
            layers=list(range(shape.layers)),
            hidden=width_scores.topk(small.width).indices.sort().values,
            heads=heads,
            head_dims=dims,
            neurons=[row.topk(small.mlp).indices.sort().values for row in neuron_scores],
        )
    return chosen


def auto_inherit(
    previous: CLIP,
    teacher: CLIP,
    target_size: int,
    mask_config: TrainConfig,
    job: DistillJob,
    reinforced: ReinforcedData | None,
    resume: bool,
) -> tuple[CLIP, TrainResult]:
    """Learn masks on a copy of ``previous`` towards ``target_size`` parameters (the ``mask_phase`` run), then fuse
    them: the stage's starting student."""
    start = Path(mask_config.run.dir) / "start.safetensors"
    if not start.exists():
        start.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint(previous, start)
    mask_config.model.name = str(start)
    if reinforced is not None:
        extra = reinforced.objective_arguments()
    else:  # the teacher runs (and is checked against the student) only when λ > 0
        extra = {"teachers": [copy.deepcopy(teacher)] if job.settings.distill_weight > 0 else []}
    objective = AutoInheritance(mask_config, job, target_size, previous.config, **extra)
    result = train(mask_config, resume=resume, objective=objective)
    student_config = fused_config(previous.config, objective.masks)
    chosen = fused_selection(result.model, objective.masks, student_config)
    fused = inherit(result.model, student_config, chosen=chosen)
    return fused, result

