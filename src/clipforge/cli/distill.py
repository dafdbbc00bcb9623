"""``clipforge distill``: TinyCLIP's inheritance, affinity mimicking and progressive stages; MobileCLIP's reinforced data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from clipforge._util.progress import console, say, warn
from clipforge.cli.options import TrainSetOption, checked_output, on_first_rank
from clipforge.cli.tables import table as table_of


def register(app: typer.Typer) -> None:
    app.command("distill")(distill_command)


def _scale(text: str, name: str, keyword: str) -> float | None:
    if text == keyword:
        return None
    try:
        return float(text)
    except ValueError:
        from clipforge.errors import ConfigError

        raise ConfigError(f"--{name} {text!r}: expected a number or {keyword!r}") from None


def distill_command(
    teacher: Annotated[list[str], typer.Option(help="Teacher checkpoint (anything clipforge.load reads); repeat for an ensemble (MobileCLIP), the student inherits from the first.")],
    student: Annotated[str, typer.Option(help="inherit:RATIO (manual inheritance), auto:RATIO (learned masks), inherit/auto with --stages, or a config name/JSON.")],
    data: Annotated[str, typer.Option(help="Training data: 'synthetic', shards, a folder or a manifest; reinforced shards (clipforge data reinforce) train without running the teacher.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (stages, checkpoints, final model.safetensors).")] = Path("runs/distill"),
    stages: Annotated[str | None, typer.Option(help="Progressive compression: the teacher shares of each stage, e.g. 0.75,0.5,0.25.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Training TOML (schedule, optimizer, ...); default: the demo recipe.")] = None,
    set_: TrainSetOption = None,
    init: Annotated[str, typer.Option(help="inherit (the teacher's selected slices) or scratch (random weights: a baseline).")] = "inherit",
    layers: Annotated[str, typer.Option(help="Blocks a shallower student takes: uniform (TinyCLIP's interval) or first.")] = "uniform",
    order: Annotated[str, typer.Option(help="Widths kept: importance (by weight magnitude) or leading (TinyCLIP's official slices).")] = "importance",
    distill_weight: Annotated[float, typer.Option(help="λ of (1 − λ)·CLIP + λ·affinity mimicking (TinyCLIP 1; MobileCLIP 0.75 or 1).")] = 1.0,
    teacher_scale: Annotated[str, typer.Option(help="Teacher logit scale 1/τ (TinyCLIP 50, MobileCLIP 100), or 'own' for its learned one.")] = "50",
    student_scale: Annotated[str, typer.Option(help="Fixed student logit scale (TinyCLIP 50), or 'learned' (MobileCLIP).")] = "50",
    resume: Annotated[bool, typer.Option(help="Resume the run directory's stages (--no-resume starts it over).")] = True,
) -> None:
    """Distil a teacher into a smaller student (TinyCLIP, MobileCLIP), on the trainer and under torchrun.

    The student's checkpoint records its teacher, method and stages; rerunning resumes.
    """
    from clipforge.cli.options import load_model
    from clipforge.demo import DEMO_CONFIG, recipe_path
    from clipforge.distill import (
        DistillJob,
        DistillSettings,
        distill,
        parse_stages,
        parse_student,
    )
    from clipforge.distill.reinforced import detect_reinforced
    from clipforge.train.config import load_config

    checked_output(out, directory=True)
    student_spec = parse_student(student)
    job = DistillJob(
        student_spec,
        parse_stages(stages, student_spec),
        init=init,
        layers=layers,
        order=order,
        settings=DistillSettings(distill_weight, _scale(teacher_scale, "teacher-scale", "own"), _scale(student_scale, "student-scale", "learned")),
    )
    overrides = [*(set_ or []), f"data.train={json.dumps(data)}", f"run.dir={json.dumps(str(out))}"]
    experiment = load_config(config or recipe_path(DEMO_CONFIG), overrides)
    first, *others = [(load_model(source), source) for source in teacher]
    reinforced = detect_reinforced(data)
    result = distill(
        *first, job, experiment, ensemble=others, reinforced=reinforced,
        evaluator=_evaluator(experiment, first[0]), resume=resume,
    )
    if not on_first_rank():
        return
    if result.finished_earlier:
        say(f"{out} holds a finished distillation (--no-resume runs it again); its figures:")
    table = table_of("stage", "parameters", "steps", *sorted(result.evaluation), title=escape(f"clipforge distill → {out}"))
    for number, (stage, count) in enumerate(zip(result.stages, result.parameters), start=1):
        figures = [f"{stage.evaluation.get(key, float('nan')):.4f}" for key in sorted(result.evaluation)]
        table.add_row(str(number), f"{count:,}", str(stage.steps), *figures)
    console.print(table)
    for number, count, target in result.missed_targets():
        warn("size", f"stage {number}: the student has {count:,} parameters, not the {target:,} aimed at "
             f"({count / target - 1:+.1%}): the mask phase missed its target (docs/distill.md: the steps it needs)")
    say(f"student: {out / 'model.safetensors'} ({result.wall_s:.0f} s of training)")


def _evaluator(experiment: Any, teacher: Any) -> Any:
    """The synthetic world's zero-shot figures when training on it (the world itself, or shards it wrote)."""
    from clipforge.data.synthetic import SyntheticWorld, WorldConfig
    from clipforge.demo import synthetic_benchmark

    data = Path(experiment.data.train)
    manifest = data / "world.json" if data.is_dir() else None
    if experiment.data.train == "synthetic":
        world = WorldConfig(seed=experiment.data.world_seed, image_size=experiment.data.image_size or teacher.config.vision.image_size)
    elif manifest is not None and manifest.is_file():
        world = WorldConfig(**json.loads(manifest.read_text())["world"])
    else:
        return None
    return synthetic_benchmark(experiment, SyntheticWorld(world))
