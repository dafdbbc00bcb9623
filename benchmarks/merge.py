"""Merging on the synthetic world: model soups (Wortsman et al., ICML 2022) and continual merging with
OPCM (Tang et al., NeurIPS 2025) against continual task arithmetic, plus peak memory for 2 vs 6 models.

Everything is trained here by clipforge's trainer and cached under ``--cache`` (rerun: finished models
are reused, a killed fine-tune resumes from its last checkpoint):

- base: the demo recipe (``configs/synthetic-tiny.toml``: 600 steps from scratch);
- soup ingredients: the base fine-tuned on its own world for ``soup_steps`` steps at each learning rate of
  ``SOUP_LRS`` (a sweep as in the paper: some rates too high), for each of 2 seeds; held-out choice on
  ``shape_color`` of the ``val`` split, figures on the ``test`` split (the demo's task);
- task models: the base fine-tuned on 5 worlds (``TASKS``: shapes drawn as outlines, shapes on clutter,
  counting, position, the few-shot shapes), each evaluated zero-shot on its own task; validation sets (for
  λ) are other images of the same splits.

Settings fixed before any result was seen: the paper's grids (task arithmetic λ ∈ {0.05, …, 1}, TIES
λ ∈ {0.8, …, 2.5} on validation, keep 20%), OPCM α = 0.5 with the diagonal zeroed, continual task
arithmetic λ = 0.3 (it ends at θ₀ + 0.3 Σ τ whatever the order), task orders: as listed and reversed.

    python benchmarks/merge.py [--quick] [--cache runs/bench-merge]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _common import parser, print_table, report

import clipforge
from clipforge.data.synthetic import SyntheticWorld, WorldConfig
from clipforge.demo import recipe_path
from clipforge.eval.datasets import ClassificationDataset, SyntheticTask
from clipforge.eval.runner import Evaluator
from clipforge.merge import (
    HeldOut,
    greedy_soup,
    opcm,
    task_arithmetic,
    ties,
    uniform_soup,
)
from clipforge.train.config import load_config
from clipforge.train.trainer import train

SOUP_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
SOUP_SEEDS = (0, 1)
CTA_SCALING = 0.3


@dataclass(frozen=True)
class Task:
    """A fine-tuning world and the zero-shot task (on a split, maybe shifted) it is scored on."""

    name: str
    world: dict
    eval_task: str
    split: str = "test"
    shift: str | None = None
    samples_per_epoch: int | None = None


TASKS = (
    Task("outline", {"split_shifts": {"train": "outline"}}, "shape", shift="outline"),
    Task("clutter", {"split_shifts": {"train": "clutter_background"}}, "shape", shift="clutter_background"),
    Task("count", {"count_weights": [1, 1, 1], "second_object_rate": 0.0}, "count"),
    Task("position", {"count_weights": [1, 0, 0], "second_object_rate": 0.0}, "position"),
    Task("fewshot", {"few_shot_k": 2500, "few_shot_window": 10000}, "shape_all", split="test_fewshot", samples_per_epoch=10000),
)


@dataclass(frozen=True)
class Settings:
    base_steps: int
    soup_steps: int
    soup_lrs: tuple[float, ...]
    task_steps: int
    task_lr: float
    test_samples: int
    val_samples: int


FULL = Settings(base_steps=600, soup_steps=60, soup_lrs=SOUP_LRS, task_steps=100, task_lr=1e-3, test_samples=2048, val_samples=1024)
QUICK = Settings(base_steps=200, soup_steps=20, soup_lrs=SOUP_LRS[1:], task_steps=30, task_lr=1e-3, test_samples=512, val_samples=256)


def run_training(run_dir: Path, overrides: list[str], world: dict | None = None) -> Path:
    """The demo recipe with ``overrides`` (and ``data.world``), trained into ``run_dir`` (resumed or skipped if done there)."""
    config = load_config(recipe_path("synthetic-tiny.toml"), [*overrides, f"run.dir={json.dumps(str(run_dir))}", "run.progress=false"])
    config.data.world = world or {}
    config.validate()
    if not (run_dir / "model.safetensors").is_file():
        print(f"training {run_dir.name} ({config.schedule.steps} steps)", flush=True)
        train(config)
    return run_dir / "model.safetensors"


def fine_tune(cache: Path, name: str, base: Path, steps: int, lr: float, seed: int, world: dict | None = None, epoch: int | None = None) -> Path:
    overrides = [
        f"model.name={json.dumps(str(base))}",
        f"schedule.steps={steps}",
        "schedule.warmup=10",
        "schedule.kind=cosine",
        f"optimizer.lr={lr}",
        f"run.seed={seed}",
        "checkpoint.every=50",
    ]
    if epoch:
        overrides.append(f"data.samples_per_epoch={epoch}")
    return run_training(cache / name, overrides, world)


def labelled(task: str, split: str, start: int, count: int, shift: str | None = None) -> ClassificationDataset:
    """The images among samples ``start … start + count`` of ``split`` that ``task`` labels."""
    world = SyntheticWorld(WorldConfig())
    scenes = list(world.samples(split, start, start + count, shift))
    return SyntheticTask(world, world.tasks()[task]).labelled(scenes, f"synthetic/{task}@{split}+{shift or 'none'}[{start}:]")


def task_sets(task: Task, settings: Settings) -> tuple[ClassificationDataset, ClassificationDataset]:
    """(validation, test): the test split's first samples, and later ones of the same split for validation."""
    test = labelled(task.eval_task, task.split, 0, settings.test_samples, task.shift)
    validation = labelled(task.eval_task, task.split, 100_000, settings.val_samples, task.shift)
    return validation, test


def accuracy(model: clipforge.CLIP, dataset: ClassificationDataset) -> float:
    return Evaluator(model, batch_size=256, workers=0).zeroshot(dataset).metrics["acc1"]


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2


# -- model soups --


def soups(cache: Path, base: Path, settings: Settings) -> tuple[list[list], dict]:
    validation = labelled("shape_color", "val", 0, settings.val_samples)
    test = labelled("shape_color", "test", 0, settings.test_samples)
    held_out = HeldOut([validation])
    rows, per_seed = [], {"greedy": [], "uniform": [], "best": [], "oracle": [], "greedy_val": [], "best_val": []}
    for seed in SOUP_SEEDS:
        paths = [fine_tune(cache, f"soup-s{seed}-lr{lr:g}", base, settings.soup_steps, lr, 100 * seed + i) for i, lr in enumerate(settings.soup_lrs)]
        tests = [accuracy(clipforge.load(path), test) for path in paths]
        greedy = greedy_soup(base, paths, held_out)
        record = greedy.provenance["merge"]
        vals = [item["held_out_accuracy"] for item in record["ingredients"]]
        best = max(range(len(paths)), key=lambda i: vals[i])
        figures = {
            "greedy": accuracy(greedy, test),
            "uniform": accuracy(uniform_soup(base, paths), test),
            "best": tests[best],
            "oracle": max(tests),
            "greedy_val": record["held_out_accuracy"],
            "best_val": vals[best],
        }
        for key, value in figures.items():
            per_seed[key].append(value)
        kept = "+".join(f"{lr:g}" for lr, item in zip(settings.soup_lrs, record["ingredients"], strict=True) if item["kept"])
        rows += [[f"seed {seed}: lr {lr:g}", round(v, 4), round(t, 4)] for lr, v, t in zip(settings.soup_lrs, vals, tests, strict=True)]
        rows += [
            [f"seed {seed}: uniform soup", "", round(figures["uniform"], 4)],
            [f"seed {seed}: greedy soup ({kept})", round(figures["greedy_val"], 4), round(figures["greedy"], 4)],
        ]
    means = {key: statistics.mean(values) for key, values in per_seed.items()}
    results = {
        "greedy_soup_acc": round(means["greedy"], 4),
        "greedy_soup_spread": round(spread(per_seed["greedy"]), 4),
        "best_ingredient_acc": round(means["best"], 4),
        "best_ingredient_spread": round(spread(per_seed["best"]), 4),
        "uniform_soup_acc": round(means["uniform"], 4),
        "uniform_soup_spread": round(spread(per_seed["uniform"]), 4),
        "oracle_ingredient_acc": round(means["oracle"], 4),
        "greedy_soup_val_acc": round(means["greedy_val"], 4),
        "best_ingredient_val_acc": round(means["best_val"], 4),
        "soup_claim_holds": all(g >= b and g >= u for g, b, u in zip(per_seed["greedy"], per_seed["best"], per_seed["uniform"], strict=True)),
    }
    return rows, results


# -- merging tasks --


def task_merging(cache: Path, base: Path, settings: Settings) -> tuple[list[list], dict]:
    paths = [fine_tune(cache, f"task-{t.name}", base, settings.task_steps, settings.task_lr, 0, t.world, t.samples_per_epoch) for t in TASKS]
    sets = [task_sets(task, settings) for task in TASKS]
    held_out = HeldOut([validation for validation, _ in sets])

    def scores(model: clipforge.CLIP) -> list[float]:
        return [accuracy(model, test) for _, test in sets]

    models = {
        "base": clipforge.load(base),
        "continual task arithmetic (λ 0.3)": task_arithmetic(base, paths, scaling=CTA_SCALING),
        "task arithmetic (λ on val)": task_arithmetic(base, paths, held_out=held_out),
        "TIES (λ on val)": ties(base, paths, held_out=held_out),
        "weight average": uniform_soup(base, paths),
        "OPCM, as listed": opcm(base, paths),
        "OPCM, reversed": opcm(base, paths[::-1]),
    }
    table = {name: scores(model) for name, model in models.items()}
    table["fine-tuned (each on its task)"] = [accuracy(clipforge.load(path), test) for path, (_, test) in zip(paths, sets, strict=True)]
    rows = [[name, *(round(a, 4) for a in accs), round(statistics.mean(accs), 4)] for name, accs in table.items()]
    average = {name: statistics.mean(accs) for name, accs in table.items()}
    orders = [average["OPCM, as listed"], average["OPCM, reversed"]]
    cta = average["continual task arithmetic (λ 0.3)"]
    results = {
        "opcm_avg_acc": round(statistics.mean(orders), 4),
        "opcm_avg_acc_spread": round(spread(orders), 4),
        "opcm_avg_acc_orders": [round(a, 4) for a in orders],
        "cta_avg_acc": round(cta, 4),
        "ta_avg_acc": round(average["task arithmetic (λ on val)"], 4),
        "ta_scaling": models["task arithmetic (λ on val)"].provenance["merge"]["coefficients"]["scaling"],
        "ties_avg_acc": round(average["TIES (λ on val)"], 4),
        "ties_scaling": models["TIES (λ on val)"].provenance["merge"]["coefficients"]["scaling"],
        "weight_average_avg_acc": round(average["weight average"], 4),
        "finetuned_avg_acc": round(average["fine-tuned (each on its task)"], 4),
        "base_avg_acc": round(average["base"], 4),
        "opcm_lambdas": [round(x, 3) for x in models["OPCM, as listed"].provenance["merge"]["coefficients"]["lambdas"]],
        "opcm_claim_holds": all(order >= cta for order in orders),
    }
    return rows, results


# -- peak memory --

MEMORY_SCRIPT = """
import json, sys
import clipforge.merge as merge
from clipforge.eval.datasets import load_dataset
from clipforge.io.checkpoint import read_checkpoint

def status(field):  # this process's own figures (getrusage's maxrss would count the parent's, inherited at fork)
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024

method, base, models = sys.argv[1], sys.argv[2], sys.argv[3:]
held_out = merge.HeldOut([load_dataset("synthetic:color@val", samples=128)]) if method == "greedy_soup" else None
before = status("VmRSS")
if method == "load_all":  # the reference: every model in memory at once, then their mean
    states = [read_checkpoint(m)[0].state_dict() for m in models]
    mean = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
elif method == "greedy_soup":
    merge.greedy_soup(base, models, held_out)
else:
    getattr(merge, method)(base, models)
print(json.dumps({"before_mb": before, "peak_mb": status("VmHWM")}))
"""
MEMORY_METHODS = ("uniform_soup", "greedy_soup", "opcm", "ties", "load_all")
MEMORY_COUNTS = (2, 6, 10)


def peak_memory(base: Path, models: list[Path]) -> dict:
    """Peak RSS (MB) of one process per method and model count; ``before`` is the process after its imports."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    found = {}
    for count in MEMORY_COUNTS:
        for method in MEMORY_METHODS:
            argv = [sys.executable, "-c", MEMORY_SCRIPT, method, str(base), *map(str, models[:count])]
            found[(method, count)] = json.loads(subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    return found


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--cache", type=Path, default=Path("runs/bench-merge"), help="where the trained models are kept")
    args = arguments.parse_args()
    settings = QUICK if args.quick else FULL
    cache = args.cache / ("quick" if args.quick else "full")
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return round(clock[-1] - clock[-2], 1)

    base = run_training(cache / "base", [f"schedule.steps={settings.base_steps}", f"schedule.cooldown={settings.base_steps // 4}"])
    timings = {"base_s": lap()}
    soup_rows, soup_figures = soups(cache, base, settings)
    timings["soups_s"] = lap()
    task_rows, task_figures = task_merging(cache, base, settings)
    timings["tasks_s"] = lap()
    fine_tunes = sorted(cache.glob("soup-s*/model.safetensors")) + sorted(cache.glob("task-*/model.safetensors"))
    memory = peak_memory(base, fine_tunes)
    timings["memory_s"] = lap()
    model_mb = base.stat().st_size / 2**20
    streamed = ("uniform_soup", "greedy_soup", "opcm")
    memory_figures = {
        **{f"peak_mb_{count}": round(max(memory[(m, count)]["peak_mb"] for m in streamed), 1) for count in MEMORY_COUNTS},
        "model_mb": round(model_mb, 1),
        **{f"peak_mb_{count}_{method}": round(memory[(method, count)]["peak_mb"], 1) for method in MEMORY_METHODS for count in MEMORY_COUNTS},
    }
    memory_rows = [
        [method, *(round(memory[(method, count)]["peak_mb"], 1) for count in MEMORY_COUNTS), round(memory[(method, 2)]["before_mb"], 1)]
        for method in MEMORY_METHODS
    ]
    print_table("model soups (shape_color: held-out = val split, figures = test split)", ["model", "val acc", "test acc"], soup_rows)
    print_table("merging 5 task models (zero-shot accuracy on each task's test images)", ["model", *(t.name for t in TASKS), "average"], task_rows)
    figures = {**soup_figures, **task_figures, **memory_figures, **timings, "wall_s": round(clock[-1] - clock[0], 1), "cache": str(cache)}
    columns = ["method", *(f"{count} models" for count in MEMORY_COUNTS), "before merging"]
    report(f"peak RSS (MB), one process per cell; a model is {model_mb:.1f} MB", columns, memory_rows, figures)


if __name__ == "__main__":
    main()
