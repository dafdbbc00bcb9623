"""Training throughput: clipforge's trainer vs open_clip's training loop at equal settings, same tiny model and batch.

All loops train `synthetic-tiny` from the same random weights on the synthetic world with the CLIP loss,
AdamW (decay on matrices only, betas 0.9/0.98, eps 1e-6), gradient clipping at 1.0 and the same batch,
one data worker each, in one process with torch's threads. The variants:

- **clipforge**: its trainer with the demo recipe's settings: bf16 autocast, no augmentation (the eval
  transform), text computed up to the batch's last end token; and the same with ``precision.amp=fp32``;
- **open_clip, bf16 autocast** (the headline peer): the step of ``open_clip_train/train.py`` with
  ``--precision amp_bf16`` (``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward and loss),
  ``preprocess_val`` (identical to clipforge's eval transform: resize, centre crop, normalise; checked
  to 0 difference), its tokenizer and ``ClipLoss`` in a ``DataLoader``;
- **open_clip, fp32**: the same loop and transform in fp32 (``--precision fp32``). The rule, fixed before
  any run: each side's best is its faster precision (on a CPU whose bf16 matrix multiply is slower than
  its fp32 one a user trains in fp32), and ``train_vs_best_peer`` is clipforge's best over ``best_peer``;
- **open_clip, fp32 with preprocess_train**: the same loop as its README's minimal example is written
  (fp32, random-resized-crop augmentation): the previous baseline, kept as a labelled last row.

Variants are timed in turn (round 1: A, B, C, D; round 2: A, B, C, D; ...); each run's throughput is taken in
windows of ``WINDOW`` steps, its first window (worker start-up, first kernels) dropped, and the figure is
the median over all windows of all rounds. ``train_vs_openclip_same_precision`` is clipforge over open_clip
bf16; its per-round ratios show the spread. Achieved GFLOP/s counts 6 × the matrix parameters × the
tokens through them per sample (``_machine.clip_forward_flops``; text: the captions' mean length with
start and end tokens, the same useful work on both sides, so padding open_clip computes is not counted).

``--demo`` instead races the demo recipe in clipforge and in the open_clip loop to 0.85 64-way shape+color
zero-shot accuracy (``demo_time_vs_openclip``; see ``demo_race``).

    python benchmarks/train.py [--quick] [--demo]
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from _common import parser, report
from _machine import (
    clip_forward_flops,
    library_versions,
    machine_limits,
    print_machine,
    roofline_fraction,
)
from torch.utils.data import DataLoader

import clipforge
from clipforge.data.synthetic import SyntheticStream, SyntheticWorld, WorldConfig
from clipforge.demo import recipe_path
from clipforge.train.config import TrainConfig, load_config
from clipforge.train.metrics_log import read_metrics
from clipforge.train.step import resolve_amp
from clipforge.train.trainer import train

WINDOW = 5
DEMO_TARGET = 0.85
AMP = {"bf16": torch.bfloat16, "fp32": None}
VARIANTS = {  # name: (label, precision, transform)
    "clipforge": ("clipforge trainer, bf16 autocast", "bf16", "eval transform"),
    "clipforge_fp32": ("clipforge trainer, fp32", "fp32", "eval transform"),
    "open_clip_bf16": ("open_clip loop, amp_bf16", "bf16", "preprocess_val"),
    "open_clip_fp32": ("open_clip loop, fp32", "fp32", "preprocess_val"),
    "open_clip_fp32_augmented": ("open_clip loop, fp32", "fp32", "preprocess_train"),
}
Scheduler = Callable[[torch.optim.Optimizer], Callable[[int], Any]]
OURS, PEERS = ("clipforge", "clipforge_fp32"), ("open_clip_bf16", "open_clip_fp32")  # each side's best: the faster


def open_clip_config(tmp: Path) -> str:
    """Register synthetic-tiny with open_clip under its own name (open_clip's JSON layout)."""
    import open_clip

    cfg = clipforge.get_model_config("synthetic-tiny").to_dict()
    vision = {k: cfg["vision_cfg"][k] for k in ("image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio")}
    text = {k: cfg["text_cfg"][k] for k in ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")}
    (tmp / "synthetic-tiny-openclip.json").write_text(json.dumps({"embed_dim": cfg["embed_dim"], "vision_cfg": vision, "text_cfg": text}))
    open_clip.add_model_config(tmp / "synthetic-tiny-openclip.json")
    return "synthetic-tiny-openclip"


def open_clip_steps(
    name: str, state: dict, config: TrainConfig, precision: str, augmented: bool, scheduler: Scheduler | None = None
) -> tuple[torch.nn.Module, Iterator[int]]:
    """open_clip's model and a generator that runs one optimizer step per ``next`` (yielding the step count).

    The step is ``open_clip_train.train.train_one_epoch``'s for accum_freq 1: the scheduler's rate (built by
    ``scheduler(optimizer)``; default constant), forward and loss under the precision's autocast, backward,
    gradient-norm clipping, AdamW step, logit scale clamped to [0, ln 100].
    """
    import open_clip

    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(name)
    model.load_state_dict(state)
    tokenizer = open_clip.get_tokenizer(name)
    world = SyntheticWorld(WorldConfig(seed=config.data.world_seed, image_size=64))
    stream = SyntheticStream(world, "train", image_transform=preprocess_train if augmented else preprocess_val)
    loader = DataLoader(stream, batch_size=config.schedule.batch_size, num_workers=config.data.workers,
                        collate_fn=lambda items: (torch.stack([i for i, _ in items]), tokenizer([c for _, c in items])))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    optimizer = torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": config.optimizer.weight_decay}],
        lr=config.optimizer.lr, betas=(config.optimizer.beta1, config.optimizer.beta2), eps=config.optimizer.eps,
    )
    adjust_lr = scheduler(optimizer) if scheduler else (lambda step: None)
    loss_fn = open_clip.ClipLoss()
    autocast = torch.autocast("cpu", dtype=AMP[precision], enabled=AMP[precision] is not None)

    def steps() -> Iterator[int]:
        model.train()
        for step, (images, texts) in enumerate(loader):
            adjust_lr(step)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                image_features, text_features, logit_scale = model(images, texts)
                loss = loss_fn(image_features, text_features, logit_scale)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip, norm_type=2.0)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            yield step + 1

    return model, steps()


def open_clip_windows(name: str, state: dict, config: TrainConfig, precision: str, augmented: bool) -> list[float]:
    """Samples/s of each ``WINDOW``-step window after the first, for ``config.schedule.steps`` steps."""
    _, steps = open_clip_steps(name, state, config, precision, augmented)
    rates, window_start = [], time.perf_counter()
    for step in steps:
        if step % WINDOW == 0:
            now = time.perf_counter()
            rates.append(WINDOW * config.schedule.batch_size / (now - window_start))
            window_start = now
        if step == config.schedule.steps:
            break
    return rates[1:]


def clipforge_windows(overrides: list[str], run_dir: Path) -> list[float]:
    """Samples/s of each of the trainer's logged windows after the first."""
    train(load_config(recipe_path("synthetic-tiny.toml"), [*overrides, f"run.dir={json.dumps(str(run_dir))}"]), resume=False)
    return [row["samples_per_s"] for row in read_metrics(run_dir) if "samples_per_s" in row][1:]


def mean_caption_tokens(count: int = 512) -> float:
    """Mean tokens per synthetic caption, start and end tokens included."""
    world, tokenizer = SyntheticWorld(WorldConfig(image_size=64)), clipforge.load("synthetic-tiny").tokenizer
    return statistics.mean(int((tokenizer([world.sample("train", i).caption])[0] != 0).sum()) for i in range(count))


def throughput(quick: bool) -> None:
    limits = machine_limits(quick)
    print_machine(limits)
    steps, rounds = (20, 2) if quick else (40, 3)
    # A few dozen steps time the step; the schedule's shape does not matter (the demo's cool-down would not fit)
    overrides = [f"schedule.steps={steps}", "schedule.kind=const", "schedule.warmup=0", f"run.log_every={WINDOW}",
                 "run.progress=false", "checkpoint.every=100000"]
    config = load_config(recipe_path("synthetic-tiny.toml"), overrides)
    torch.manual_seed(0)
    model = clipforge.load("synthetic-tiny")
    flops = 3 * clip_forward_flops(model, mean_caption_tokens())
    windows: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    per_round: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        name = open_clip_config(Path(tmp))
        for round_ in range(rounds):
            rates = {}
            for variant, (_, precision, transform) in VARIANTS.items():
                if variant in OURS:
                    rates[variant] = clipforge_windows([*overrides, f"precision.amp={precision}"], Path(tmp) / f"{variant}-{round_}")
                else:
                    rates[variant] = open_clip_windows(name, model.state_dict(), config, precision, transform == "preprocess_train")
            for variant, values in rates.items():
                windows[variant] += values
            per_round.append(round(statistics.median(rates["clipforge"]) / statistics.median(rates["open_clip_bf16"]), 3))
    median = {variant: statistics.median(rates) for variant, rates in windows.items()}
    best_ours, best_peer = max(OURS, key=median.__getitem__), max(PEERS, key=median.__getitem__)
    sides = {
        variant: {
            "precision": f"{precision} autocast" if precision == "bf16" else "fp32",
            "transform": transform,
            "threads": torch.get_num_threads(),
            "data_workers": config.data.workers,
            "samples_per_s": round(median[variant], 1),
            "windows": len(windows[variant]),
            "achieved_gflops": round(flops * median[variant] / 1e9, 1),
            "roofline_fraction": round(roofline_fraction(flops, median[variant], precision, limits), 4),
        }
        for variant, (_, precision, transform) in VARIANTS.items()
    }
    figures = {
        "benchmark": "train",
        "model": "synthetic-tiny",
        "batch_size": config.schedule.batch_size,
        **{f"samples_per_s_{variant.replace('open_clip', 'openclip')}": side["samples_per_s"] for variant, side in sides.items()},
        "train_vs_openclip_same_precision": round(median["clipforge"] / median["open_clip_bf16"], 3),
        "train_vs_openclip_same_precision_per_round": per_round,
        "clipforge_best": best_ours,
        "best_peer": best_peer,
        "train_vs_best_peer": round(median[best_ours] / median[best_peer], 3),
        "train_vs_openclip_fp32": round(median["clipforge"] / median["open_clip_fp32"], 3),
        "train_vs_openclip_fp32_augmented": round(median["clipforge"] / median["open_clip_fp32_augmented"], 3),
        "flops_per_sample": round(flops),
        "flops_rule": "6 x matrix params x tokens (text: mean caption length), attention scores left out",
        "sides": sides,
        "versions": library_versions(),
        "machine": limits,
    }
    report(
        f"Training throughput (synthetic-tiny, batch {config.schedule.batch_size}, {torch.get_num_threads()} threads, "
        f"medians of {WINDOW}-step windows, {rounds} interleaved rounds)",
        ["loop", "transform", "samples/s", "GFLOP/s", "of limit", "clipforge bf16 ×"],
        [[VARIANTS[v][0], s["transform"], f"{s['samples_per_s']:.1f}", f"{s['achieved_gflops']:.1f}",
          f"{s['roofline_fraction']:.0%}", f"{median['clipforge'] / median[v]:.2f}"] for v, s in sides.items()],
        figures,
    )


def demo_race(quick: bool) -> None:
    """The demo recipe (batch 256, const-cooldown rate, 600 steps) in clipforge and in open_clip's loop, both in the
    precision the recipe's ``precision.amp = "auto"`` chooses on this machine (bf16 autocast or fp32).

    Both start from the trainer's initial weights (seed 0) and see the synthetic world's training scenes
    (open_clip in stream order through its ``preprocess_val``, clipforge in its seeded permutation); open_clip
    uses ``open_clip_train.scheduler.const_lr_cooldown`` with the recipe's rate, warm-up and cool-down.
    Every ``every`` steps both models are scored by the same evaluator (clipforge's ``SyntheticBenchmark``,
    the open_clip weights copied into a clipforge model): 64-way shape+color zero-shot accuracy. Time to
    ``DEMO_TARGET`` is training wall time up to the first evaluation at or above it, evaluations excluded,
    data-worker start-up and clipforge's periodic checkpoints included. The two runs are long, so they run
    once each, one after the other. ``--quick``: 40 steps on 512 test images (the target is not reached).
    """
    from open_clip_train.scheduler import const_lr_cooldown

    from clipforge.demo import synthetic_benchmark
    from clipforge.train.trainer import build_model

    print_machine(machine_limits(quick=True))
    every = 20 if quick else 50
    overrides = [f"eval.every={every}", f"run.log_every={every}", "run.progress=false"]
    overrides += ["schedule.steps=40", "schedule.warmup=10", "schedule.cooldown=10", "eval.samples=512"] if quick else []
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(recipe_path("synthetic-tiny.toml"), [*overrides, f"run.dir={json.dumps(tmp + '/run')}"])
        benchmark = synthetic_benchmark(config)
        torch.manual_seed(config.run.seed)
        start = build_model(config)
        calls: list[tuple[float, float]] = []  # (seconds evaluating, shape+color accuracy) per evaluation

        def timed(model: torch.nn.Module) -> dict[str, float]:
            began = time.perf_counter()
            figures = benchmark(model)
            calls.append((time.perf_counter() - began, figures["acc_shape_color"]))
            return figures

        train(config, resume=False, evaluator=timed)
        elapsed = [row["elapsed_s"] for row in read_metrics(Path(tmp) / "run") if "elapsed_s" in row]
        ours = [(elapsed[i] - sum(c[0] for c in calls[:i]), calls[i][1]) for i in range(len(calls))]
        precision = resolve_amp(config.precision.amp, torch.device("cpu"))
        theirs = open_clip_demo(open_clip_config(Path(tmp)), start, config, every, benchmark, const_lr_cooldown, precision)
    figures = {"benchmark": "train_demo", "steps": config.schedule.steps, "eval_every": every, "target": DEMO_TARGET}
    for side, curve in (("clipforge", ours), ("openclip", theirs)):
        reached = next((seconds for seconds, accuracy in curve if accuracy >= DEMO_TARGET), None)
        figures |= {f"{side}_time_to_target_s": reached, f"{side}_train_s": round(curve[-1][0], 1),
                    f"{side}_final_acc_shape_color": curve[-1][1], f"{side}_curve": [[round(t, 1), a] for t, a in curve]}
    mine, peer = figures["clipforge_time_to_target_s"], figures["openclip_time_to_target_s"]
    figures["demo_time_vs_openclip"] = round(peer / mine, 3) if mine and peer else None
    figures["demo_time_vs_openclip_at_least"] = round(figures["openclip_train_s"] / mine, 3) if mine and not peer else None
    figures |= {"precision": {"clipforge": precision, "openclip": precision}, "threads": torch.get_num_threads(), "versions": library_versions()}
    report(
        f"Demo recipe race to {DEMO_TARGET} shape+color accuracy ({config.schedule.steps} steps, evaluated every {every})",
        ["loop", "time to target (s)", "training time (s)", "final shape+color"],
        [[side, figures[f"{key}_time_to_target_s"] or "not reached", figures[f"{key}_train_s"], figures[f"{key}_final_acc_shape_color"]]
         for side, key in ((f"clipforge trainer, {precision}", "clipforge"), (f"open_clip loop, {precision}", "openclip"))],
        figures,
    )


def open_clip_demo(name: str, start: torch.nn.Module, config: TrainConfig, every: int, benchmark: Callable, schedule: Callable,
                   precision: str) -> list[tuple[float, float]]:
    """(training seconds, shape+color accuracy) at every ``every`` steps of the open_clip loop."""
    cfg = config.schedule
    scheduler = functools.partial(schedule, base_lr=config.optimizer.lr, warmup_length=cfg.warmup, steps=cfg.steps,
                                  cooldown_steps=cfg.cooldown, cooldown_power=cfg.cooldown_power, cooldown_end_lr=cfg.cooldown_end_lr)
    model, steps = open_clip_steps(name, start.state_dict(), config, precision, False, scheduler)
    judged = clipforge.load(config.model.name)
    curve, evaluating, began = [], 0.0, time.perf_counter()
    for step in steps:
        if step % every == 0:
            paused = time.perf_counter()
            judged.load_state_dict(model.state_dict())
            curve.append((paused - began - evaluating, benchmark(judged.eval())["acc_shape_color"]))
            evaluating += time.perf_counter() - paused
        if step == cfg.steps:
            return curve
    return curve


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--demo", action="store_true", help="race the demo recipe to 0.85 shape+color accuracy instead")
    args = arguments.parse_args()
    if args.demo:
        demo_race(args.quick)
    else:
        throughput(args.quick)


if __name__ == "__main__":
    main()
