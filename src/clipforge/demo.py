"""``clipforge demo``: train the tiny CLIP on the synthetic world, evaluate it and write a report.

No network, no downloads: the data is rendered on the fly (``clipforge.data.synthetic``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from PIL import Image

from clipforge._util.fileio import atomic_path
from clipforge.config import get_model_config
from clipforge.data.synthetic import SyntheticWorld, WorldConfig
from clipforge.encode import Encoder, embed_images, encode_texts
from clipforge.errors import ConfigError
from clipforge.eval.synthetic import SyntheticBenchmark
from clipforge.train.config import TrainConfig, load_config
from clipforge.train.plots import loss_curve
from clipforge.train.trainer import train

DEMO_CONFIG = "synthetic-tiny.toml"
SUMMARY_KEYS = ("acc_shape_color", "acc_color", "acc_shape", "acc_heldout_combos", "recall_at_1_i2t")
EXAMPLE_QUERIES = ("a red circle", "a blue star", "two green squares", "a yellow heart on the left")


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
    started = time.perf_counter()
    config = load_config(recipe_path(DEMO_CONFIG), [f"run.dir={json.dumps(str(out))}", *(overrides or [])])
    world = synthetic_world(config)
    result = train(config, resume=resume, evaluator=synthetic_benchmark(config, world))
    run_dir = result.run_dir
    examples = [sample.image for sample in world.samples("test", 0, 256)]
    retrieval_grid(result.model, EXAMPLE_QUERIES, examples, run_dir / "retrievals.png")
    loss_curve(run_dir, run_dir / "loss.png")
    figures = {key: result.evaluation.get(key) for key in SUMMARY_KEYS}
    summary = {"wall_s": round(time.perf_counter() - started, 1), **figures, "run_dir": str(run_dir)}
    report = {**summary, "steps": result.steps, "final_loss": round(result.final_loss, 4), "train_samples_per_s": round(result.samples_per_s, 1)}
    write_markdown(run_dir / "report.md", "clipforge demo", report, {"loss curve": "loss.png", "example retrievals": "retrievals.png"})
    if result.skips:
        (run_dir / "skipped.txt").write_text(result.skips + "\n")
    return summary


def retrieval_grid(model: Encoder, queries: Sequence[str], images: Sequence[Image.Image], path: Path, k: int = 5) -> Path:
    """For each text query, its top-k images among ``images`` with their cosine similarity."""
    image_features = torch.from_numpy(embed_images(model, images, workers=0, strict=True, progress=False).embeddings)
    top = (encode_texts(model, queries) @ image_features.T).topk(k, dim=1)
    figure = Figure(figsize=(1.6 * k + 2.2, 1.7 * len(queries)), dpi=110)
    for row, query in enumerate(queries):
        for col in range(k):
            axes = figure.add_subplot(len(queries), k, row * k + col + 1)
            axes.imshow(images[int(top.indices[row, col])])
            axes.set_xticks([])
            axes.set_yticks([])
            axes.set_title(f"{float(top.values[row, col]):.2f}", fontsize=7)
            if col == 0:
                axes.set_ylabel(query, fontsize=8, rotation=0, ha="right", va="center")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def write_markdown(path: Path, title: str, figures: dict[str, Any], images: dict[str, str]) -> Path:
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in figures.items()]
    lines.append("")
    lines += [f"![{name}]({file})" for name, file in images.items()]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
