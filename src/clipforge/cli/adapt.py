"""``clipforge adapt METHOD``: fit a few-shot method and write an adapter file (or, for weight methods, a checkpoint);
or train a task recipe (CLIPN, re-identification, altered-image detector) on ``--data``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipforge._util.progress import say
from clipforge.cli.options import (
    ConfigOption,
    DeviceOption,
    ModelOption,
    PrecisionOption,
    PretrainedOption,
    SetOption,
    checked_checkpoint,
    load_model,
)

METHOD_NAMES = (
    "tip-adapter", "gda", "tip-adapter-f", "linear-probe", "clap", "coop", "maple", "clip-lora", "clip-svd", "wise-ft",
)
"""Listed here so that ``clipforge adapt --help`` needs no torch; ``tests/test_adapt_cli.py`` checks it against
``clipforge.adapt.METHODS``."""
RECIPE_NAMES = ("clipn", "detector", "reid")
"""The task recipes (``clipforge.adapt.recipes.RECIPES``, docs/recipes.md): they train on ``--data``, not on shots."""


def register(app: typer.Typer) -> None:
    app.command("adapt")(adapt_command)


def adapt_command(
    method: Annotated[str, typer.Argument(help=f"One of: {', '.join(METHOD_NAMES)}; or a task recipe: {', '.join(RECIPE_NAMES)}.")],
    model: ModelOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter .safetensors file (a checkpoint for clip-lora, clip-svd, wise-ft).")],
    train: Annotated[str | None, typer.Option("--train", help="synthetic:TASK[+SHIFT], a class-per-folder directory, a table or .tar webdataset shards with a class column.")] = None,
    shots: Annotated[int | None, typer.Option(min=1, help="Training images per class.")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Task recipes: their training data (see docs/recipes.md).")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the few-shot draw and of training.")] = 1,
    set_: SetOption = None,
    classnames: Annotated[str | None, typer.Option(help="Class names: .txt (one per line) or JSON list.")] = None,
    templates: Annotated[str | None, typer.Option(help="Prompt templates with {c}: .txt or JSON list; or CuPL JSON.")] = None,
    image_column: Annotated[str, typer.Option(help="Table column with image paths or bytes.")] = "image",
    label_column: Annotated[str, typer.Option(help="Table column with class ids or names.")] = "label",
    class_field: Annotated[str, typer.Option(help="Webdataset class field (member extension or JSON key).")] = "cls",
    precision: PrecisionOption = "fp32",
    device: DeviceOption = "auto",
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
) -> None:
    """Fit METHOD on SHOTS images per class of --train (docs/adapt.md), or a task recipe on --data
    (docs/recipes.md), and write it to --out."""
    from clipforge.adapt import fit, get_method
    from clipforge.compress.records import parse_settings
    from clipforge.errors import InputError

    settings = parse_settings(set_ or [], "--set")
    source = model + (f"/{pretrained}" if pretrained else "")  # as clipforge train records its base
    if method in RECIPE_NAMES:
        if data is None:
            raise InputError(f"adapt {method}: give the training data with --data")
        note = checked_checkpoint(out, inputs=[model])
        fit_recipe(method, load_model(model, config, pretrained, precision, device), data, settings, seed, out, note,
                   model_source=source, classnames_file=classnames, image_column=image_column,
                   label_column=label_column, class_field=class_field)
        return
    get_method(method)  # an unknown method fails before the model loads
    if train is None or shots is None:
        raise InputError(f"adapt {method}: give --train and --shots")
    note = checked_checkpoint(out, inputs=[model])
    loaded = load_model(model, config, pretrained, precision, device)
    adapter = fit(method, loaded, train, shots, seed, settings=settings, progress=True, model_source=source,
                  classnames_file=classnames, templates_file=templates, image_column=image_column,
                  label_column=label_column, class_field=class_field)
    path = adapter.save(out)
    record = adapter.record
    skipped = record.provenance.get("skipped_images", 0)
    say(
        f"{method}: {len(record.classnames)} classes × {shots} shots from {train} (seed {seed})"
        + (f", {skipped} unreadable images skipped" if skipped else "")
        + _chosen(record.extra)
        + f"\n{_wrote(adapter, path)}{note}"
    )


def fit_recipe(method: str, model: object, data: str, settings: dict, seed: int, out: Path, note: str, **options: object) -> None:
    """Train a task recipe, write it, and say what was written."""
    from clipforge.adapt.recipes import fit_recipe as fit_one

    result = fit_one(method, model, data, settings, seed, progress=True, **options)
    path = result.save(out)
    say(f"{method}: trained on {data} (seed {seed}){_chosen(result.record.extra)}\n{_wrote(result, path)}{note}")


def _chosen(extra: dict) -> str:
    """The fitted values of a record (``extra``) as ``; key=value, ...``, or nothing."""
    chosen = ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in extra.items())
    return f"; {chosen}" if chosen else ""


def _wrote(result: object, path: Path) -> str:
    """What was written: a checkpoint by the fits that tune the model (they carry it), else an adapter file."""
    return f"wrote {'checkpoint' if getattr(result, 'model', None) is not None else 'adapter'} {path}"
