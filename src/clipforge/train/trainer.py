"""The training loop: one entry point for one CPU, one GPU, or many ranks under ``torchrun``.

``train(config)`` builds the model (from scratch or any checkpoint clipforge loads), the data, the
loss and AdamW, then steps with bf16 autocast, logs to ``metrics.jsonl``, evaluates zero-shot
periodically and writes atomic checkpoints; rerunning the same command resumes exactly where the
last checkpoint left off (weights, optimizer, schedule, RNG and data position), and rerunning a finished run
returns the figures saved with its last checkpoint without training or evaluating again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge._util.fileio import atomic_path
from clipforge._util.progress import bar_is_hidden, log_line, progress_bar
from clipforge.data.loader import build_train_loader
from clipforge.data.sources import CaptionSource, open_source
from clipforge.errors import ConfigError, TrainingError
from clipforge.io.checkpoint import read_checkpoint, write_checkpoint
from clipforge.io.state_dict import weights_fingerprint
from clipforge.layers.patch_dropout import PatchDropout
from clipforge.models.clip import CLIP
from clipforge.preprocess.transforms import image_transform
from clipforge.train.config import TrainConfig
from clipforge.train.distributed import WorldInfo, init_distributed
from clipforge.train.losses import (
    MAX_LOGIT_SCALE,
    SIGLIP_INIT_LOGIT_BIAS,
    SIGLIP_INIT_LOGIT_SCALE,
)
from clipforge.train.metrics_log import MetricsLog
from clipforge.train.objective import Objective
from clipforge.train.optim import build_optimizer, learning_rate, set_learning_rate
from clipforge.train.resume import (
    latest_checkpoint,
    load_resume_state,
    restore_rng,
    save_checkpoint,
)
from clipforge.train.step import ContrastiveStep

FINAL_MODEL = "model.safetensors"  # the run's result, loadable anywhere
Evaluator = Callable[[CLIP], dict[str, float]]


@dataclass
class TrainResult:
    run_dir: Path
    model: CLIP
    steps: int
    final_loss: float
    wall_s: float
    samples_per_s: float
    evaluation: dict[str, float]
    skips: str
    precision: str  # the autocast precision trained in (``auto`` resolved for this machine)
    finished_earlier: bool = False  # the run directory held this finished run: the figures are its saved ones


def train(
    config: TrainConfig, *, resume: bool = True, evaluator: Evaluator | None = None, objective: Objective | None = None
) -> TrainResult:
    """Train ``config``; ``objective`` (default: the contrastive loss of ``config.loss``) decides what is minimised."""
    objective = objective or Objective(config.loss)
    world = init_distributed()
    device = _device(world)
    run_dir = Path(config.run.dir)
    is_main = world.rank == 0
    if is_main:
        _check_run_dir(run_dir, config, resume)
    torch.manual_seed(config.run.seed)
    model = build_model(config)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    state = load_resume_state(checkpoint) if checkpoint else None
    if state is not None:
        model.load_state_dict(read_checkpoint(state.model_path)[0].state_dict())
    model.to(device)
    objective.prepare(model, device)
    optimizer = build_optimizer(model, config.optimizer)
    for group in objective.param_groups():
        optimizer.add_param_group(group)
    start_step = 0
    if state is not None:
        objective.load_state_dict(state.objective)
        optimizer.load_state_dict(state.optimizer)
        restore_rng(state.rng)
        start_step = state.step
        if state.result is not None:  # finished: a kill after its last checkpoint may have cut model.safetensors
            if is_main and not (run_dir / FINAL_MODEL).is_file():
                _write_final_model(run_dir, model, config)
            return TrainResult(run_dir, model.eval(), config.schedule.steps, **state.result, finished_earlier=True)
    loader = _train_loader(config, model, world, state.data_position if state else None, objective.source(config))
    wrapped = _wrap(model, config, world, device)
    step_fn = ContrastiveStep(
        wrapped,
        objective.loss_fn(),
        optimizer,
        amp=config.precision.amp,
        accum_freq=config.schedule.accum_freq,
        grad_clip=config.optimizer.grad_clip,
        device=device,
    )
    log = MetricsLog(run_dir, enabled=is_main, resume_step=start_step, tensorboard=config.run.tensorboard)
    evaluation: dict[str, float] = {}
    loss = torch.zeros(())
    started = time.perf_counter()
    window_start, window_samples = started, 0
    batches = iter(loader)
    plain_lines = is_main and config.run.progress and bar_is_hidden()  # piped to a file: a line per metrics row
    with progress_bar(disable=not (is_main and config.run.progress)) as bar:
        task = bar.add_task("training", total=config.schedule.steps, completed=start_step, unit="step")
        for step in range(start_step, config.schedule.steps):
            lr = learning_rate(step, config.optimizer.lr, config.schedule)
            set_learning_rate(optimizer, lr)
            model.train()
            objective.begin_step(step)
            images, texts, *extras = next(batches)
            targets = objective.targets(images, texts, extras[0] if extras else None)
            loss = _global_mean(step_fn(images, texts, targets), world)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"step {step + 1}: the loss is {loss.item()} (training diverged); nothing was saved after step "
                    f"{_last_saved(step, config)}; lower optimizer.lr or raise schedule.warmup and rerun"
                )
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            window_samples += config.schedule.batch_size
            done = step + 1
            bar.update(task, advance=1, description=f"training · loss {loss.item():.3f}")
            if done % config.run.log_every == 0 or done == config.schedule.steps:
                now = time.perf_counter()
                row = {
                    "step": done,
                    "loss": round(loss.item(), 6),
                    "lr": lr,
                    "logit_scale": round(model.logit_scale.exp().item(), 4),
                    "samples_per_s": round(window_samples / (now - window_start), 2),
                    "elapsed_s": round(now - started, 2),
                    **objective.metrics(),
                }
                log.log(row)
                if plain_lines:
                    log_line(_progress_line(row, config.schedule.steps, (now - started) / (done - start_step)))
                window_start, window_samples = now, 0
            if evaluator is not None and config.eval.every and done % config.eval.every == 0 and done < config.schedule.steps:
                log.log({"step": done, **_evaluate(model, evaluator, world)})
            if config.checkpoint.every and done % config.checkpoint.every == 0 and done < config.schedule.steps:
                _checkpoint(run_dir, done, model, optimizer, loader.position, config, world, objective.state_dict())
    wall = time.perf_counter() - started
    if evaluator is not None:
        evaluation = _evaluate(model, evaluator, world)
        log.log({"step": config.schedule.steps, **evaluation})
    steps_run = config.schedule.steps - start_step
    result = {
        "final_loss": loss.item(),
        "wall_s": wall,
        "samples_per_s": steps_run * config.schedule.batch_size / wall if wall > 0 else 0.0,
        "evaluation": evaluation,
        "skips": loader.skips.summary(),
        "precision": step_fn.amp,
    }  # saved with the last checkpoint, after the final evaluation (a kill before it resumes from the previous one)
    _checkpoint(run_dir, config.schedule.steps, model, optimizer, loader.position, config, world, objective.state_dict(), result)
    log.close()
    if is_main:
        _write_final_model(run_dir, model, config)
    return TrainResult(run_dir, model.eval(), config.schedule.steps, **result)


def _write_final_model(run_dir: Path, model: CLIP, config: TrainConfig) -> None:
    write_checkpoint(model, run_dir / FINAL_MODEL, provenance={"trained_steps": config.schedule.steps})


def build_model(config: TrainConfig) -> CLIP:
    """The model to train: loaded or initialised, with patch dropout, locking and checkpointing applied.

    Its provenance records the weights it starts from (``base``: source and ``weights_fingerprint``), so
    ``clipforge merge`` can check that fine-tunes come from the same base.
    """
    section = config.model
    model, compression = read_checkpoint(section.name, section.config, pretrained=section.pretrained)
    if compression is not None:
        raise ConfigError(
            f"model.name: {section.name} records compression steps (see `clipforge info`); train from the "
            "uncompressed checkpoint it was made from"
        )
    source = section.name + (f"/{section.pretrained}" if section.pretrained else "")
    model.provenance = {**model.provenance, "base": {"source": source, "fingerprint": weights_fingerprint(model.state_dict())}}
    model.eval()
    model.visual.patch_dropout = PatchDropout(section.patch_dropout)
    if config.loss.kind == "siglip" and model.logit_bias is None:
        model.logit_scale.data.fill_(SIGLIP_INIT_LOGIT_SCALE)
        model.logit_bias = nn.Parameter(torch.tensor(SIGLIP_INIT_LOGIT_BIAS))
        model.config = dataclasses.replace(model.config, init_logit_bias=SIGLIP_INIT_LOGIT_BIAS)
    if section.lock_image:
        model.lock_image_tower(section.lock_image_unlocked_groups)
    if section.lock_text:
        model.lock_text_tower(section.lock_text_unlocked_layers)
    model.set_grad_checkpointing(section.grad_checkpointing)
    return model


def _last_saved(step: int, config: TrainConfig) -> int:
    """The last step at or before ``step`` whose checkpoint the run wrote (0: none)."""
    every = config.checkpoint.every
    return step - step % every if every else 0


def _device(world: WorldInfo) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def _check_run_dir(run_dir: Path, config: TrainConfig, resume: bool) -> None:
    """Refuse to resume a run directory that holds a run with another configuration.

    A field the saved configuration lacks (written before the field existed) counts as its default.
    """
    saved = run_dir / "config.json"
    current = config.to_dict()
    comparable = {k: v for k, v in current.items() if k not in ("run", "eval")}
    if resume and saved.is_file():
        previous = json.loads(saved.read_text())
        defaults = TrainConfig().to_dict()
        for section, values in comparable.items():
            for key, value in values.items():
                before = previous.get(section, {}).get(key, defaults[section][key])
                if before != value:
                    raise ConfigError(
                        f"{run_dir} holds a run with {section}.{key}={before!r}, "
                        f"not {value!r}; choose another run directory, or pass --no-resume to start this one over"
                    )
    with atomic_path(saved) as tmp:
        tmp.write_text(json.dumps(current, indent=2) + "\n")


def _train_loader(
    config: TrainConfig, model: CLIP, world: WorldInfo, position: dict[str, Any] | None, source: CaptionSource | None
) -> Any:
    data = config.data
    if config.schedule.batch_size % world.world_size:
        raise ConfigError(f"schedule.batch_size: {config.schedule.batch_size} is not divisible by {world.world_size} ranks")
    spec: str | dict[str, Any] = data.train
    if data.train == "synthetic":
        spec = {
            "type": "synthetic",
            "length": data.samples_per_epoch,
            "seed": data.world_seed,
            "image_size": data.image_size or model.config.vision.image_size,
            **data.world,
        }
    return build_train_loader(
        source or open_source(spec),
        model.train_transform() if data.augment else image_transform(model.preprocess_cfg, train=False),
        model.tokenizer,
        batch_size=config.schedule.batch_size // world.world_size,
        workers=data.workers,
        seed=config.run.seed,
        rank=world.rank,
        world_size=world.world_size,
        strict=data.strict,
        start=position,
    )


def _wrap(model: CLIP, config: TrainConfig, world: WorldInfo, device: torch.device) -> nn.Module:
    wrapped: nn.Module = model
    if world.world_size > 1:
        if config.precision.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in [*model.visual.transformer.resblocks, *model.transformer.resblocks]:
                fully_shard(block)
            wrapped = fully_shard(model)
        else:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.model.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def _global_mean(value: torch.Tensor, world: WorldInfo) -> torch.Tensor:
    if world.world_size == 1:
        return value.cpu()
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return (value / world.world_size).cpu()


def _evaluate(model: CLIP, evaluator: Evaluator, world: WorldInfo) -> dict[str, float]:
    model.eval()
    results = evaluator(model) if world.rank == 0 else {}
    model.train()
    return results


def _progress_line(row: dict[str, Any], steps: int, seconds_per_step: float) -> str:
    """``step 120/600 · loss 2.3456 · 512 samples/s · ETA 4:01`` for a metrics row."""
    remaining = round(seconds_per_step * (steps - row["step"]))
    return (
        f"step {row['step']}/{steps} · loss {row['loss']:.4f} · {row['samples_per_s']:.0f} samples/s · "
        f"ETA {remaining // 60}:{remaining % 60:02d}"
    )


def _checkpoint(
    run_dir: Path,
    step: int,
    model: CLIP,
    optimizer: torch.optim.Optimizer,
    position: dict[str, Any],
    config: TrainConfig,
    world: WorldInfo,
    objective_state: dict[str, Any],
    result: dict[str, Any] | None = None,
) -> None:
    if world.rank == 0:
        save_checkpoint(run_dir, step, model, optimizer, position, config.checkpoint.keep, objective_state, result)
    if world.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
