"""``clipforge demo``: train the tiny CLIP on the synthetic world, evaluate it and write a report.

No network, no downloads: the data is rendered on the fly (``clipforge.data.synthetic``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from clipforge._util.fileio import atomic_path
from clipforge.config import get_model_config
from clipforge.data.synthetic import SyntheticWorld, WorldConfig
from clipforge.encode import Encoder, embed_images, encode_texts
from clipforge.errors import ConfigError, InputError, one_line
from clipforge.eval.synthetic import RETRIEVAL_SAMPLES, SyntheticBenchmark
from clipforge.train.config import TrainConfig, load_config
from clipforge.train.plots import loss_curve
from clipforge.train.trainer import train

DEMO_CONFIG = "synthetic-tiny.toml"
SUMMARY_KEYS = ("acc_shape_color", "acc_color", "acc_shape", "acc_heldout_combos", "recall_at_1_i2t")
SUMMARY_FILE = "summary.json"
POOL = 256  # test images the example retrievals search


def recipe_path(name: str) -> Path:
    return Path(str(resources.files("clipforge") / "configs" / name))


def synthetic_world(config: TrainConfig) -> SyntheticWorld:
    """The synthetic world a config trains on, rendered at the data's or the model's image size."""
    image_size = config.data.image_size
    if image_size is None:
        if Path(config.model.name).is_file() and not config.model.name.endswith(".json"):
            raise ConfigError("data.image_size: set it to train a checkpoint on the synthetic world (e.g. data.image_size=64)")
        image_size = get_model_config(config.model.name).vision.image_size
    return SyntheticWorld(WorldConfig(seed=config.data.world_seed, image_size=image_size, **config.data.world))


def synthetic_benchmark(config: TrainConfig, world: SyntheticWorld | None = None) -> SyntheticBenchmark:
    """The evaluation of ``config.eval`` (tasks, samples) on the synthetic world's test split."""
    world = world or synthetic_world(config)
    unknown = [task for task in config.eval.tasks if task not in world.tasks()]
    if unknown:
        raise ConfigError(f"eval.tasks: {unknown[0]!r} is not a synthetic-world task ({', '.join(world.tasks())})")
    return SyntheticBenchmark(world, samples=config.eval.samples, tasks=config.eval.tasks)


def run_demo(out: str | Path, overrides: list[str] | None = None, resume: bool = True) -> dict[str, Any]:
    """Train, evaluate and report into ``out``; a finished run (``summary.json``) is not redone when resuming.

    Returns the summary figures and ``finished_earlier`` (True when they are a finished run's stored ones).
    """
    finished = Path(out) / SUMMARY_FILE
    if resume and finished.is_file():
        try:
            return {**json.loads(finished.read_text(encoding="utf-8")), "finished_earlier": True}
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise InputError(f"{finished}: unreadable summary of a finished demo ({one_line(error)}); rerun with --no-resume") from None
    started = time.perf_counter()
    config = load_config(recipe_path(DEMO_CONFIG), [f"run.dir={json.dumps(str(out))}", *(overrides or [])])
    world = synthetic_world(config)
    result = train(config, resume=resume, evaluator=synthetic_benchmark(config, world))
    run_dir = result.run_dir
    pool = [world.sample("test", index) for index in range(POOL)]
    queries = example_queries([scene.metadata for scene in pool])
    recalls = retrieval_grid(result.model, queries, [scene.image for scene in pool], relevance(queries, pool), run_dir / "retrievals.png")
    loss_curve(run_dir, run_dir / "loss.png")
    figures = {key: result.evaluation.get(key) for key in SUMMARY_KEYS}
    summary = {"wall_s": round(time.perf_counter() - started, 1), **figures, "run_dir": str(run_dir)}
    details = {"precision": result.precision, "steps": result.steps, "final_loss": round(result.final_loss, 4), "train_samples_per_s": round(result.samples_per_s, 1)}
    write_report(run_dir / "report.md", config, world, {**summary, **details}, dict(zip(queries, recalls)))
    if result.skips:
        (run_dir / "skipped.txt").write_text(result.skips + "\n")
    with atomic_path(finished) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a finished run resumes from summary.json
    return {**summary, "finished_earlier": False}


def example_queries(scenes: Sequence[dict[str, Any]], count: int = 4) -> list[str]:
    """``a {color} {shape}`` for the commonest pairs among the pool's first objects, each shape and color at most
    once: every query has several matching images."""
    pairs = Counter((scene["color"], scene["shape"]) for scene in scenes)
    chosen: list[tuple[str, str]] = []
    for color, shape in (pair for pair, _ in pairs.most_common()):
        if all(color != c and shape != s for c, s in chosen):
            chosen.append((color, shape))
    return [f"a {color} {shape}" for color, shape in chosen[:count]]


def relevance(queries: Sequence[str], scenes: Sequence[Any]) -> np.ndarray:
    """[queries, images] booleans: the image shows an object of the query's color and shape."""
    def objects(meta: dict[str, Any]) -> set[str]:
        return {f"a {meta['color']} {meta['shape']}", f"a {meta['second_color']} {meta['second_shape']}"}

    return np.array([[query in objects(scene.metadata) for scene in scenes] for query in queries])


def retrieval_grid(
    model: Encoder, queries: Sequence[str], images: Sequence[Image.Image], relevant: np.ndarray, path: Path, k: int = 5
) -> list[float]:
    """For each text query, its top-k images among ``images`` with their cosine similarity, framed green when the
    image matches the query and red when not; returns each query's recall@k (matches in the top k over
    min(k, matches in the pool))."""
    image_features = torch.from_numpy(embed_images(model, images, workers=0, strict=True, progress=False).embeddings)
    top = (encode_texts(model, queries) @ image_features.T).topk(k, dim=1)
    figure = Figure(figsize=(1.6 * k + 2.6, 1.75 * len(queries)), dpi=110)
    recalls = []
    for row, query in enumerate(queries):
        hits = [bool(relevant[row, int(index)]) for index in top.indices[row]]
        recalls.append(sum(hits) / min(k, int(relevant[row].sum())))
        for col, hit in enumerate(hits):
            axes = figure.add_subplot(len(queries), k, row * k + col + 1)
            axes.imshow(images[int(top.indices[row, col])])
            axes.set_xticks([])
            axes.set_yticks([])
            for spine in axes.spines.values():
                spine.set_edgecolor("#1a9641" if hit else "#d7191c")
                spine.set_linewidth(3)
            axes.set_title(f"{float(top.values[row, col]):.2f}", fontsize=7)
            if col == 0:
                axes.set_ylabel(f"{query}\nrecall@{k} {recalls[-1]:.2f}", fontsize=8, rotation=0, ha="right", va="center")
    figure.suptitle(f"Top {k} of {len(images)} test images per query (green: shows the query's object; red: does not)", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return recalls


MEANINGS = {
    "acc_shape_color": ("shape_color", "zero-shot: which shape × color pair (\"a photo of a red circle.\")"),
    "acc_color": ("color", "zero-shot: the object's color alone"),
    "acc_shape": ("shape", "zero-shot: the object's shape alone"),
    "acc_heldout_combos": ("shape_color", "shape × color pairs never seen together in training (compositional generalisation)"),
}


def write_report(path: Path, config: TrainConfig, world: SyntheticWorld, figures: dict[str, Any], recalls: dict[str, float]) -> Path:
    """report.md: what each figure means and its chance level, the recipe, the machine's speed, and what the
    model still gets wrong (read off the figures)."""
    def percent(key: str) -> str:
        return f"{100 * figures[key]:.1f}%" if figures.get(key) is not None else "n/a"

    tasks = world.tasks()
    schedule = config.schedule
    rows = [
        f"| {key} | {percent(key)} | 1/{len(tasks[task].classnames)} = {100 / len(tasks[task].classnames):.1f}% | {meaning} |"
        for key, (task, meaning) in MEANINGS.items()
    ]
    rows.append(
        f"| recall_at_1_i2t | {percent('recall_at_1_i2t')} | 1/{RETRIEVAL_SAMPLES} | image → text retrieval among the captions "
        f"of {RETRIEVAL_SAMPLES} test images (five each): one of the image's own captions ranks first |"
    )
    weak, strong = sorted(("acc_color", "acc_shape"), key=lambda key: figures.get(key) or 0.0)
    lines = [
        "# clipforge demo",
        "",
        f"A {config.model.name} CLIP trained from scratch on the synthetic world: {schedule.steps} steps of "
        f"{schedule.batch_size} image-caption pairs, lr {config.optimizer.lr:g} ({schedule.kind}, warm-up {schedule.warmup}), "
        f"{figures['precision']} (precision.amp = {config.precision.amp}), {figures['train_samples_per_s']} samples/s on this machine, "
        f"{figures['wall_s']:.0f} s in all (training, evaluation and this report). Final loss {figures['final_loss']}.",
        "",
        "| figure | value | chance | what it measures |",
        "|---|---|---|---|",
        *rows,
        "",
        f"What the model still gets wrong: {weak.removeprefix('acc_')} is the harder attribute ({percent(weak)} against "
        f"{percent(strong)} for {strong.removeprefix('acc_')}), and shape × color pairs never seen together in training "
        f"are recognised at {percent('acc_heldout_combos')} against {percent('acc_shape_color')} for the pairs it saw.",
        "",
        "## Example retrievals",
        "",
        f"Top 5 of the first {POOL} test images per query; green frames show the query's object, red frames do not.",
        "",
        "| query | recall@5 |",
        "|---|---|",
        *(f"| {query} | {recall:.2f} |" for query, recall in recalls.items()),
        "",
        "![example retrievals](retrievals.png)",
        "",
        "## Training loss",
        "",
        "![loss curve](loss.png)",
    ]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
