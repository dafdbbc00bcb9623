"""``clipforge train`` and ``clipforge demo``."""

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
    app.command("train")(train_command)
    app.command("demo")(demo_command)


def train_command(
    config: Annotated[Path | None, typer.Argument(help="Experiment TOML (see configs/); defaults for every field.")] = None,
    set_: TrainSetOption = None,
    run_dir: Annotated[str | None, typer.Option(help="Run directory (same as --set run.dir=...).")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from the run directory's latest checkpoint.")] = True,
) -> None:
    """Train or fine-tune a CLIP model; also under `torchrun --nproc_per_node N -m clipforge train ...`."""
    from clipforge.train.config import load_config
    from clipforge.train.trainer import train

    overrides = list(set_ or []) + ([f"run.dir={json.dumps(run_dir)}"] if run_dir else [])
    experiment = load_config(config, overrides)
    checked_output(Path(experiment.run.dir), directory=True, option="run.dir")
    result = train(experiment, resume=resume, evaluator=_synthetic_evaluator(experiment))
    if not on_first_rank():
        return
    if result.skips:
        warn("skipped samples", "\n" + result.skips)
    figures = (
        f"{result.steps} steps in {result.wall_s:.0f} s ({result.samples_per_s:.0f} samples/s, {result.precision}), "
        f"final loss {result.final_loss:.4f}; model: {result.run_dir / 'model.safetensors'}"
    )
    if result.finished_earlier:
        say(f"{result.run_dir} holds a finished run (--no-resume trains it again); it trained {figures}")
    else:
        say(f"trained {figures}")


def _synthetic_evaluator(experiment: Any) -> Any:
    """Zero-shot and retrieval figures on the synthetic world's test split, when training on that world."""
    if experiment.data.train != "synthetic":
        return None
    from clipforge.demo import synthetic_benchmark

    return synthetic_benchmark(experiment)


def demo_command(
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/demo"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field of configs/synthetic-tiny.toml.")] = None,
    resume: Annotated[bool, typer.Option(help="Resume an interrupted demo in the same directory.")] = True,
) -> None:
    """Train a tiny CLIP on the synthetic world (no network), evaluate it and write a report."""
    from clipforge.demo import run_demo

    checked_output(out, directory=True)
    summary = run_demo(out, list(set_ or []), resume=resume)
    if summary.pop("finished_earlier"):
        say(f"{out} holds a finished demo; its figures (--no-resume trains it again):")
    table = table_of("metric", "value", title="clipforge demo")
    for key, value in summary.items():
        table.add_row(key, escape(f"{value:.4f}" if isinstance(value, float) and key != "wall_s" else str(value)))
    console.print(table)
    say(f"report: {Path(summary['run_dir']) / 'report.md'}")
    print(json.dumps(summary), flush=True)
