"""``clipforge classify``: zero-shot probabilities of images over labels given on the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from clipforge._util.progress import console, say, warn
from clipforge.cli.options import (
    BatchSizeOption,
    ConfigOption,
    DeviceOption,
    ModelOption,
    PrecisionOption,
    PretrainedOption,
    WorkersOption,
    load_model,
)


def register(app: typer.Typer) -> None:
    app.command("classify")(classify_command)


def classify_command(
    images: Annotated[list[str], typer.Argument(help="Image files or folders (searched recursively).", show_default=False)],
    model: ModelOption,
    labels: Annotated[str | None, typer.Option("--labels", "-l", help='Comma-separated labels: "a dog,a cat".')] = None,
    labels_file: Annotated[Path | None, typer.Option(help="Labels: .txt (one per line) or a JSON list.")] = None,
    template: Annotated[list[str] | None, typer.Option(help="Prompt with {c} for the label, e.g. 'a photo of a {c}.' (repeatable: the prompts' mean).")] = None,
    top: Annotated[int, typer.Option("--top", "-k", min=1, help="Labels shown per image.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image (image, labels, probabilities) instead of the table.")] = False,
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
    precision: PrecisionOption = "fp32",
    device: DeviceOption = "auto",
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = None,
) -> None:
    """Zero-shot probabilities of each image over the labels (softmax of 100 × cosine, as open_clip's README).

    Unreadable images are skipped and listed.
    """
    from clipforge.errors import ConfigError
    from clipforge.eval.classify import check_labels, classify
    from clipforge.eval.prompts import read_classnames
    from clipforge.retrieval.inputs import collect_image_paths

    if (labels is None) == (labels_file is None):
        raise ConfigError("give the labels with --labels 'a dog,a cat' or --labels-file FILE (one of them)")
    names = check_labels(labels.split(","), "--labels") if labels is not None else check_labels(read_classnames(labels_file), str(labels_file))
    templates = template or ["{c}"]
    for prompt in templates:
        if "{c}" not in prompt:
            raise ConfigError(f"--template {prompt!r}: has no {{c}} where the label goes")
    unreadable: list[tuple[str, str]] = []
    paths = [str(path) for path in collect_image_paths(images, unreadable)]
    loaded = load_model(model, config, pretrained, precision, device)
    result = classify(loaded, paths, names, templates, batch_size=batch_size, workers=workers, progress=not as_json)
    for _, reason in [*unreadable, *result.skipped]:
        warn("skipped", reason)
    rows = [(paths[position], result.top(row, top)) for row, position in enumerate(result.kept)]
    if as_json:
        for path, best in rows:
            print(json.dumps({"image": path, "labels": [label for label, _ in best], "probabilities": [round(p, 6) for _, p in best]}), flush=True)
        return
    _print_table(rows)
    skipped = len(unreadable) + len(result.skipped)
    say(f"{len(rows)} images classified over {len(names)} labels" + (f"; {skipped} skipped" if skipped else ""))


def _print_table(rows: list[tuple[str, list[tuple[str, float]]]]) -> None:
    """Image, label and probability; an image's other labels on the rows below it (readable at 80 columns)."""
    from rich.markup import escape
    from rich.table import Table

    from clipforge._util.fileio import printable

    table = Table(show_lines=True)
    table.add_column("image", overflow="fold")
    table.add_column("label", overflow="fold")
    table.add_column("probability", justify="right")
    for path, best in rows:
        table.add_row(escape(printable(path)), escape("\n".join(label for label, _ in best)), "\n".join(f"{p:.3f}" for _, p in best))
    console.print(table)
