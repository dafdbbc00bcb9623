"""Experiment configuration: one TOML file per run, with ``section.field=value`` overrides.

Every field has a default, every unknown or ill-typed field is an error that names it
(``optimizer.lr: expected a number, got 'fast'``), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipforge.data.synthetic import WorldConfig
from clipforge.errors import ConfigError


@dataclass
class ModelSection:
    name: str = "synthetic-tiny"  # config name, config file or checkpoint to start from
    pretrained: str | None = None  # open_clip tag when `name` is a config name
    config: str | None = None  # config for a bare state dict
    patch_dropout: float = 0.0  # FLIP: fraction of patch tokens dropped in training
    grad_checkpointing: bool = False
    lock_image: bool = False  # LiT: freeze the image tower ...
    lock_image_unlocked_groups: int = 0  # ... except its last n layer groups
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    compile: bool = False  # torch.compile the model


@dataclass
class DataSection:
    train: str = "synthetic"  # a folder, a manifest, shards "a/{000..009}.tar", or "synthetic"
    samples_per_epoch: int = 100_000  # synthetic world only (it streams forever)
    workers: int = 1
    augment: bool = True  # open_clip's RandomResizedCrop; off: the eval transform (an endless synthetic stream needs none)
    strict: bool = False  # stop at the first corrupt sample instead of skipping it
    world_seed: int = 0  # synthetic world
    image_size: int | None = None  # synthetic world render size (default: the model's)
    # synthetic world: any other WorldConfig field, e.g. {split_shifts = {train = "outline"}, count_weights = [1, 1, 1]}
    world: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossSection:
    kind: str = "clip"  # clip | siglip
    local_loss: bool = True
    gather_with_grad: bool = True


@dataclass
class OptimizerSection:
    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float | None = 1.0


@dataclass
class ScheduleSection:
    steps: int = 1000
    warmup: int = 100
    batch_size: int = 256  # global batch (split over ranks)
    accum_freq: int = 1  # micro-batches per step; the contrastive batch stays batch_size
    kind: str = "cosine"  # cosine | const | const-cooldown
    cooldown: int = 0  # const-cooldown: steps of decay at the end (open_clip --epochs-cooldown, in steps)
    cooldown_power: float = 1.0  # 1: linear decay; otherwise polynomial (open_clip --lr-cooldown-power)
    cooldown_end_lr: float = 0.0  # learning rate reached at the last step (open_clip --lr-cooldown-end)


SCHEDULE_KINDS = ("cosine", "const", "const-cooldown")
AMP_CHOICES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class PrecisionSection:
    amp: str = "bf16"  # bf16 | fp16 | fp32 autocast, or auto: the fastest on this machine (train.step.resolve_amp)
    fsdp: bool = False  # shard parameters across ranks (FSDP2) instead of DDP


@dataclass
class EvalSection:
    every: int = 0  # zero-shot evaluation every n steps (0: only at the end)
    tasks: list[str] = field(default_factory=lambda: ["shape_color", "color", "shape"])  # synthetic-world tasks
    samples: int = 512


@dataclass
class CheckpointSection:
    every: int = 200  # checkpoint every n steps (0: only at the end)
    keep: int = 2


@dataclass
class RunSection:
    dir: str = "runs/train"
    seed: int = 0
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        checks = [
            (self.loss.kind in ("clip", "siglip"), "loss.kind", "clip or siglip"),
            (self.precision.amp in AMP_CHOICES, "precision.amp", ", ".join(AMP_CHOICES[:-1]) + " or " + AMP_CHOICES[-1]),
            (self.schedule.kind in SCHEDULE_KINDS, "schedule.kind", " or ".join(SCHEDULE_KINDS)),
            (self.schedule.steps > 0, "schedule.steps", "positive"),
            (0 <= self.schedule.warmup, "schedule.warmup", "≥ 0"),
            (
                self.schedule.kind != "const-cooldown" or 0 < self.schedule.cooldown <= self.schedule.steps - self.schedule.warmup,
                "schedule.cooldown",
                f"between 1 and steps − warmup = {self.schedule.steps - self.schedule.warmup} for const-cooldown, "
                f"got {self.schedule.cooldown} (set schedule.cooldown with schedule.steps)",
            ),
            (self.schedule.cooldown_power > 0, "schedule.cooldown_power", "positive"),
            (self.schedule.cooldown_end_lr >= 0, "schedule.cooldown_end_lr", "≥ 0"),
            (self.schedule.accum_freq >= 1, "schedule.accum_freq", "≥ 1"),
            (self.schedule.batch_size % self.schedule.accum_freq == 0, "schedule.batch_size", "divisible by accum_freq"),
            (0.0 <= self.model.patch_dropout < 1.0, "model.patch_dropout", "in [0, 1)"),
            (self.optimizer.lr > 0, "optimizer.lr", "positive"),
            (self.checkpoint.keep >= 1, "checkpoint.keep", "≥ 1"),
            (self.checkpoint.every >= 0, "checkpoint.every", "≥ 0"),
            (self.run.log_every >= 1, "run.log_every", "≥ 1"),
            (self.data.workers >= 0, "data.workers", "≥ 0"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"{name}: must be {expected}")
        if self.data.world:
            _check_world(self.data)
        return self


def _check_world(data: DataSection) -> None:
    """``data.world`` holds known ``WorldConfig`` fields with valid values, for the synthetic world only."""
    if data.train != "synthetic":
        raise ConfigError(f"data.world: applies to data.train = \"synthetic\" only, not {data.train!r}")
    known = {item.name for item in dataclasses.fields(WorldConfig)}
    own_fields = {"seed": "data.world_seed", "image_size": "data.image_size"}
    for key in data.world:
        if key in own_fields:
            raise ConfigError(f"data.world.{key}: set {own_fields[key]} instead")
        if key not in known:
            raise ConfigError(f"data.world.{key}: unknown field (known: {', '.join(sorted(known - set(own_fields)))})")
    try:
        WorldConfig(**data.world)
    except (ConfigError, TypeError, ValueError) as error:
        raise ConfigError(f"data.world: {error}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A validated config from a TOML file (or the defaults) and ``section.field=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML ({error})") from None
    config = _build(TrainConfig, values, "")
    for override in overrides or []:
        _apply_override(config, override)
    return config.validate()


def _build(kind: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(kind)
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    built = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a [{prefix}{name}] table")
            built[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            built[name] = _coerce(value, hint, f"{prefix}{name}")
    return kind(**built)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against a simple type hint (bool, int, float, str, list[str], a table, Optional)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        if typing.get_origin(option) is dict and isinstance(value, dict):
            return dict(value)
    readable = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{name}: expected {readable}, got {value!r}")


def _apply_override(config: TrainConfig, override: str) -> None:
    """``optimizer.lr=1e-3``: the value is parsed as TOML (so strings may be bare)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected section.field=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not hasattr(config, parts[0]) or not dataclasses.is_dataclass(getattr(config, parts[0])):
        raise ConfigError(f"{key}: unknown setting (use section.field, e.g. optimizer.lr)")
    section = getattr(config, parts[0])
    if parts[1] not in {f.name for f in dataclasses.fields(section)}:
        raise ConfigError(f"{key}: unknown field")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as data.train=/data/shards
    if raw.strip().lower() in ("none", "null"):
        value = None
    setattr(section, parts[1], _coerce(value, typing.get_type_hints(type(section))[parts[1]], key))
