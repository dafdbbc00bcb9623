"""Distillation on the synthetic world: TinyCLIP's inheritance + affinity mimicking, progressive compression and
MobileCLIP's reinforced data, against the same student trained with the CLIP loss.

The teachers are MobileCLIP's ensemble of two: the demo recipe (``configs/synthetic-tiny.toml``) at twice the
width (image tower 192 = 6 heads × 32, text 256 = 8 × 32, embeddings 256) trained for 1,200 steps (5x a full
student's budget: the papers' teachers have seen far more data than their students) from seeds 0 and 1, once,
and cached (their time is not counted). Students inherit from the first; every distilled arm averages both
teachers' distributions (online: both run on every batch).
Every student trains for the same number of steps on the same shards of the world's train split (batch 256,
lr 2e-3, const-cooldown as the demo, open_clip's crop augmentation), one run per seed:

- ``inherit_affinity`` (= ``online``): the 50% student (``inherit:0.5``: both towers narrowed; manual
  inheritance, uniform layers, importance order), TinyCLIP's loss (λ = 1, scale 50 for teacher and student),
  the teachers run on every batch;
- ``scratch``: the same architecture, random weights, the CLIP loss (λ = 0: bitwise the plain recipe);
- ``student_clip_only``: the inherited student, the CLIP loss only;
- ``reinforced``: the inherited student on reinforced shards (MobileCLIP: 5 stored crops, 4 extra captions
  and both teachers' embeddings per image, reinforced once beforehand; no teacher runs), the same loss;
- ``progressive_25``: 100% → 75% → 50% → 25% in three stages of a third of the steps each, online;
- ``oneshot_25``: straight to 25%, the same total steps, online.

Accuracy is zero-shot top-1 on the 64-way shape+color task (``SyntheticBenchmark``, first test images);
speed is image+text pairs per second through ``clipforge.encode`` at batch 256 (interleaved medians).

    python benchmarks/distill.py [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import interleaved_medians, parser, report

import clipforge
from clipforge.config import ModelConfig, get_model_config
from clipforge.data.synthetic import SyntheticWorld, WorldConfig, write_shards
from clipforge.demo import recipe_path
from clipforge.distill import (
    DistillJob,
    DistillSettings,
    ReinforcedData,
    count_parameters,
    distill,
    parse_stages,
    parse_student,
    reinforce,
)
from clipforge.distill.reinforced import REINFORCE_FORMAT
from clipforge.encode import encode_pixels, encode_texts
from clipforge.eval.synthetic import SyntheticBenchmark
from clipforge.train.config import load_config
from clipforge.train.trainer import train

CACHE = Path(os.environ.get("CLIPFORGE_BENCH_CACHE", Path.home() / ".cache" / "clipforge" / "benchmarks"))
SEEDS = (0, 1)
IMAGES, SHARD_SIZE = 16384, 2048
FULL = {"steps": 240, "shards": 8, "eval_samples": 1024}
QUICK = {"steps": 60, "shards": 3, "eval_samples": 512}
TINYCLIP = DistillSettings(1.0, 50.0, 50.0)
CLIP_ONLY = DistillSettings(0.0, 50.0, None)
TEACHER_SEEDS, TEACHER_STEPS = (0, 1), 1200


def teacher_config() -> ModelConfig:
    spec = get_model_config("synthetic-tiny").to_dict()
    spec["embed_dim"] = 256
    spec["vision_cfg"]["width"] = 192
    spec["text_cfg"].update(width=256, heads=8)
    spec.pop("name", None)
    return ModelConfig.from_dict(spec, name="synthetic-tiny-2x")


def cached_teacher_path(seed: int) -> Path:
    """The demo recipe at twice the width, trained for TEACHER_STEPS (5x a full student's budget) from ``seed``,
    once, and kept in the cache; its checkpoint's path."""
    path = CACHE / f"distill-teacher-2x-{TEACHER_STEPS}-seed{seed}.safetensors"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        spec = CACHE / "synthetic-tiny-2x.json"
        spec.write_text(json.dumps(teacher_config().to_dict()))
        run = CACHE / f"distill-teacher-2x-{TEACHER_STEPS}-seed{seed}-run"
        settings = {"model.name": json.dumps(str(spec)), "run.dir": json.dumps(str(run)), "run.seed": str(seed),
                    "schedule.steps": str(TEACHER_STEPS), "schedule.cooldown": str(TEACHER_STEPS // 4)}
        config = load_config(recipe_path("synthetic-tiny.toml"), [f"{key}={value}" for key, value in settings.items()])
        clipforge.save(train(config, resume=True).model, path)
    return path


def cached_teachers() -> list[tuple[clipforge.CLIP, str]]:
    """MobileCLIP's ensemble of two teachers (``cached_teacher_path`` of seeds 0 and 1). Students inherit from the first."""
    return [(clipforge.load(str(path)), str(path)) for path in map(cached_teacher_path, TEACHER_SEEDS)]


def cached_shards(world: SyntheticWorld) -> Path:
    """The first 16,384 images of the world's train split as shards of 2,048, rendered once."""
    out = CACHE / "distill-shards"
    write_shards(world, "train", IMAGES, out, shard_size=SHARD_SIZE)
    return out


def cached_reinforcement(teachers: list[tuple[clipforge.CLIP, str]], shards: Path) -> tuple[Path, float]:
    """MobileCLIP's offline step, done once with the ensemble (5 crops, 4 extra captions); returns its folder and time."""
    out = CACHE / f"distill-reinforced-2x-{TEACHER_STEPS}-ensemble-format{REINFORCE_FORMAT}"
    timing = out / "timing.json"
    if not timing.exists():
        started = time.perf_counter()
        models, paths = zip(*teachers)
        reinforce(list(models), list(paths), [shards], out, augmentations=5, caption_count=4, progress=False)
        timing.write_text(json.dumps({"reinforce_s": time.perf_counter() - started}))
    return out, json.loads(timing.read_text())["reinforce_s"]


def student_config(run_dir: Path, data: str, seed: int, steps: int):
    """The demo recipe for a student: these steps (warm-up a twelfth, cool-down a quarter), these shards, cropped."""
    settings = {
        "data.train": json.dumps(data), "data.augment": "true", "data.workers": "1", "schedule.steps": str(steps),
        "schedule.warmup": str(max(1, steps // 12)), "schedule.cooldown": str(steps // 4), "run.seed": str(seed),
        "run.dir": json.dumps(str(run_dir)), "checkpoint.every": "0", "run.progress": "false", "run.log_every": "20",
    }
    return load_config(recipe_path("synthetic-tiny.toml"), [f"{key}={value}" for key, value in settings.items()])


def pairs_per_second(models: dict[str, clipforge.CLIP], world: SyntheticWorld, repeats: int) -> dict[str, float]:
    images = [sample.image for sample in world.samples("test", 0, 256)]
    captions = [sample.caption for sample in world.samples("test", 0, 256)]
    pixels = {name: torch.stack([model.preprocess(image) for image in images]) for name, model in models.items()}
    calls = {name: (lambda m=model, p=pixels[name]: (encode_pixels(m, p), encode_texts(m, captions))) for name, model in models.items()}
    return {name: 256 / seconds for name, seconds in interleaved_medians(calls, repeats).items()}


def summary(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (max(values) - min(values)) / 2


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    settings = QUICK if args.quick else FULL
    steps = settings["steps"]
    teachers = cached_teachers()
    (teacher, teacher_path), ensemble = teachers[0], teachers[1:]
    world = SyntheticWorld(WorldConfig(image_size=64))
    evaluator = SyntheticBenchmark(world, samples=settings["eval_samples"], tasks=("shape_color",), heldout_samples=0, retrieval_samples=0)
    acc_teachers = [evaluator(model)["acc_shape_color"] for model, _ in teachers]
    shards = cached_shards(world)
    reinforced_dir, reinforce_s = cached_reinforcement(teachers, shards)
    names = [f"{number:05d}.tar" for number in range(settings["shards"])]
    plain_data = "::".join(str(shards / name) for name in names)
    reinforced = ReinforcedData([str(reinforced_dir / name) for name in names])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        half, quarter = parse_student("inherit:0.5"), parse_student("inherit:0.25")
        arms = {
            "inherit_affinity": (DistillJob(half, [0.5], settings=TINYCLIP), None),
            "scratch": (DistillJob(half, [0.5], init="scratch", settings=CLIP_ONLY), None),
            "student_clip_only": (DistillJob(half, [0.5], settings=CLIP_ONLY), None),
            "reinforced": (DistillJob(half, [0.5], settings=TINYCLIP), reinforced),
            "progressive_25": (DistillJob(parse_student("inherit"), parse_stages("0.75,0.5,0.25", parse_student("inherit")), settings=TINYCLIP), None),
            "oneshot_25": (DistillJob(quarter, [0.25], settings=TINYCLIP), None),
        }
        accuracy: dict[str, list[float]] = {name: [] for name in arms}
        wall: dict[str, list[float]] = {name: [] for name in arms}
        students = {}
        for seed in SEEDS:
            for name, (job, data) in arms.items():
                config = student_config(root / f"{name}-{seed}", plain_data, seed, steps)
                result = distill(teacher, teacher_path, job, config, ensemble=ensemble, reinforced=data, evaluator=evaluator, resume=False)
                accuracy[name].append(result.evaluation["acc_shape_color"])
                wall[name].append(result.wall_s)
                students[name] = result.model
                print(f"{name} seed {seed}: {accuracy[name][-1]:.4f} in {result.wall_s:.0f} s", flush=True)
        speed = pairs_per_second({"teacher": teacher, "student": students["inherit_affinity"]}, world, 5 if args.quick else 15)
    total_s = time.perf_counter() - started
    means = {name: summary(values) for name, values in accuracy.items()}
    walls = {name: statistics.mean(values) for name, values in wall.items()}
    parameters = {name: count_parameters(model.config) for name, model in students.items()}
    teacher_parameters = count_parameters(teacher.config)
    figures = {
        "benchmark": "distill",
        "quick": args.quick,
        "steps": steps,
        "seeds": len(SEEDS),
        "acc_teacher": acc_teachers[0],
        "acc_teachers": acc_teachers,
        "teacher_steps": TEACHER_STEPS,
        **{f"acc_{name}": round(mean, 4) for name, (mean, _) in means.items()},
        **{f"spread_{name}": round(spread, 4) for name, (_, spread) in means.items()},
        "acc_online": round(means["inherit_affinity"][0], 4),
        "acc_progressive_25": round(means["progressive_25"][0], 4),
        "acc_oneshot_25": round(means["oneshot_25"][0], 4),
        "student_params_share": round(parameters["inherit_affinity"] / teacher_parameters, 4),
        "student_speedup": round(speed["student"] / speed["teacher"], 3),
        "wall_online_s": round(walls["inherit_affinity"], 1),
        "wall_reinforced_s": round(walls["reinforced"], 1),
        "reinforced_vs_online_wall": round(walls["reinforced"] / walls["inherit_affinity"], 3),
        "reinforce_s_once": round(reinforce_s, 1),
        "images": settings["shards"] * SHARD_SIZE,
        "total_s": round(total_s, 1),
    }
    rows = [[f"teacher {number} (2x demo, {TEACHER_STEPS} steps)", f"{acc:.4f}", "", "1.00", "", ""] for number, acc in enumerate(acc_teachers, start=1)]
    for name in arms:
        mean, spread = means[name]
        rows.append([name, f"{mean:.4f}", f"± {spread:.4f}", f"{parameters[name] / teacher_parameters:.2f}", f"{walls[name]:.0f}",
                     ", ".join(f"{a:.3f}" for a in accuracy[name])])
    report(
        f"Distillation on the synthetic world ({steps} steps per student, batch 256, {len(SEEDS)} seeds; 64-way shape+color)",
        ["arm", "accuracy (mean)", "half-range", "params / teacher", "train s", "per seed"],
        rows,
        figures,
    )


if __name__ == "__main__":
    main()
