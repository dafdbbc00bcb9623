"""``clipforge demo``: train the tiny CLIP on the synthetic world, evaluate it and write a report.

No network, no downloads: the data is rendered on the fly (``clipforge.data.synthetic``).
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from clipforge.config import get_model_config
from clipforge.data.synthetic import SyntheticWorld, WorldConfig
from clipforge.errors import ConfigError
from clipforge.eval.synthetic import SyntheticBenchmark, encode_pil_images
from clipforge.train.config import TrainConfig, load_config
from clipforge.train.report import loss_curve, retrieval_grid, write_markdown
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
    return SyntheticWorld(WorldConfig(seed=config.data.world_seed, image_size=image_size))


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
    examples = list(world.samples("test", 0, 256))
    features = encode_pil_images(result.model, [s.image for s in examples])
    retrieval_grid(result.model, EXAMPLE_QUERIES, [s.image for s in examples], features, run_dir / "retrievals.png")
    loss_curve(run_dir, run_dir / "loss.png")
    figures = {key: result.evaluation.get(key) for key in SUMMARY_KEYS}
    summary = {"wall_s": round(time.perf_counter() - started, 1), **figures, "run_dir": str(run_dir)}
    report = {**summary, "steps": result.steps, "final_loss": round(result.final_loss, 4), "train_samples_per_s": round(result.samples_per_s, 1)}
    write_markdown(run_dir / "report.md", "clipforge demo", report, {"loss curve": "loss.png", "example retrievals": "retrievals.png"})
    if result.skips:
        (run_dir / "skipped.txt").write_text(result.skips + "\n")
    return summary
