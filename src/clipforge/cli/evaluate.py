"""``clipforge eval`` (zero-shot, retrieval, linear probe, robustness, OOD, calibration) and ``clipforge explain``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from clipforge._util.progress import console, say
from clipforge.cli.options import (
    BatchSizeOption,
    CompressOption,
    ConfigOption,
    DeviceOption,
    ModelOption,
    PrecisionOption,
    PretrainedOption,
    SamplesOption,
    TomeOption,
    checked_output,
    compression_options,
    load_model,
)
from clipforge.cli.tables import table as table_of


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("explain")(explain_command)


def eval_command(
    tasks: Annotated[list[str], typer.Argument(help="zeroshot, retrieval, linear-probe, robustness, ood, calibration, detection, reid, adversarial (comma-separated or repeated), or all (all but detection, reid and adversarial).")],
    model: ModelOption,
    data: Annotated[list[str], typer.Option("--data", "-d", help="synthetic[:task], a class-per-folder directory, a .csv/.tsv/.parquet table or .tar webdataset shards (repeatable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the JSON results, plots and report.md/report.html.")] = Path("eval_results"),
    precision: PrecisionOption = "fp32",
    device: DeviceOption = "auto",
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
    classnames: Annotated[str | None, typer.Option(help="Class names: .txt (one per line) or JSON list.")] = None,
    templates: Annotated[str | None, typer.Option(help="Prompt templates with {c}: .txt or JSON list; or CuPL JSON {class: [descriptions]}.")] = None,
    samples: SamplesOption = 1000,
    robustness_samples: Annotated[int, typer.Option(min=1, help="Images corrupted by the robustness task.")] = 500,
    image_column: Annotated[str, typer.Option(help="Table column with image paths or bytes.")] = "image",
    label_column: Annotated[str, typer.Option(help="Table column with class ids or names.")] = "label",
    caption_column: Annotated[str, typer.Option(help="Table column with captions (retrieval).")] = "caption",
    class_field: Annotated[str, typer.Option(help="Webdataset class field (member extension or JSON key).")] = "cls",
    train_data: Annotated[str | None, typer.Option(help="Training images for linear-probe (any --data form).")] = None,
    ood_data: Annotated[str | None, typer.Option(help="Out-of-distribution images for ood (any --data form).")] = None,
    method: Annotated[str, typer.Option(help="Zero-shot method: ensemble | perceptionclip.")] = "ensemble",
    context: Annotated[str | None, typer.Option(help="PerceptionCLIP contexts: JSON {factor: {value: [descriptions]}}.")] = None,
    batch_size: BatchSizeOption = 64,
    workers: Annotated[int | None, typer.Option(min=0, help="Decoding processes (default: cores - 1).")] = None,
    language: Annotated[str, typer.Option(help="Language recorded in the results (CLIP_benchmark schema).")] = "en",
    tome: TomeOption = None,
    compress: CompressOption = None,
    epsilons: Annotated[str, typer.Option(help="adversarial: L∞ budgets in 1/255 (comma-separated).")] = "1,2,4",
    adapter: Annotated[str | None, typer.Option(help="Adapter file or adapted checkpoint from clipforge adapt: zeroshot and calibration classify with it; a CLIPN adapter adds CTW and ATD to ood.")] = None,
) -> None:
    """Evaluate a model; one CLIP_benchmark JSON per (dataset, task), a report and one summary table."""
    from clipforge.compress.records import describe_steps
    from clipforge.eval.adversarial import check_epsilons
    from clipforge.eval.report import headline_rows, write_report
    from clipforge.eval.results import TASKS, write_results
    from clipforge.eval.runner import Evaluator
    from clipforge.eval.tasks import RECIPE_TASKS, DataOptions, run_tasks

    names = [name.strip() for item in tasks for name in item.split(",") if name.strip()]
    names = [task for task in TASKS if task not in RECIPE_TASKS] if names == ["all"] else names
    steps = compression_options(tome, compress)
    checked_output(out, directory=True)
    loaded = load_model(model, config, pretrained, precision, device, steps)
    model_name = loaded.config.name + (f"+{describe_steps(steps)}" if steps else "")
    options = DataOptions(
        classnames_file=classnames, templates_file=templates, samples=samples, robustness_samples=robustness_samples,
        image_column=image_column, label_column=label_column, caption_column=caption_column, class_field=class_field,
        train_data=train_data, ood_data=ood_data, method=method, context_file=context,
        epsilons=tuple(check_epsilons(parse_numbers(epsilons, "--epsilons"))),
    )
    head = no_encoder = None
    if adapter is not None:
        from clipforge.adapt import load_adapter

        found = load_adapter(adapter)
        if found.method == "clipn":
            from clipforge.adapt.clipn import load_no_encoder

            no_encoder = load_no_encoder(found.record, loaded, adapter)
        else:
            head = found(loaded)
        model_name += f"+{found.method}"
    evaluator = Evaluator(head.image_model if head else loaded, batch_size=batch_size, workers=workers, out_dir=out,
                          progress=True, adapter=head, no_encoder=no_encoder)
    results = run_tasks(evaluator, names, data, options)
    pretrained_label = pretrained or (model if Path(model).exists() else "random-init")
    write_results(results, out, model_name, pretrained_label, language)
    markdown, _ = write_report(results, out, f"clipforge eval: {model_name} ({pretrained_label})")
    table = table_of("dataset", "task", "metric", "value", title=f"clipforge eval ({_runs_in(loaded, precision)})")
    for row in headline_rows(results):
        table.add_row(*map(escape, row))
    console.print(table)
    say(f"results: {out}/*.json, report: {markdown}")


def _runs_in(model: object, precision: str) -> str:
    """The number format the model runs in: an export's label, else the one its checkpoint records, else ``precision``."""
    from clipforge.compress.records import compression_steps, number_format

    label = getattr(model, "label", None)
    return label if isinstance(label, str) else number_format(compression_steps(model)) or precision


def explain_command(
    image: Annotated[Path, typer.Argument(help="Image file to explain.")],
    model: ModelOption,
    text: Annotated[str, typer.Argument(help="Text to explain the image against (Score-CAM).")] = "",
    out: Annotated[Path, typer.Option("--out", "-o", help="Overlay image: .png, .jpg or .webp.")] = Path("map.png"),
    method: Annotated[str, typer.Option(help="scorecam (image-text) | rollout (attention rollout, no text).")] = "scorecam",
    weighting: Annotated[str | None, typer.Option(help="Score-CAM channel weights: cosine | logit | increase (default: the tested one, see docs/eval.md).")] = None,
    precision: PrecisionOption = "fp32",
    device: DeviceOption = "auto",
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
) -> None:
    """Save a heat map of what the image tower looks at, over the image as the model sees it."""
    from clipforge._util.imageio import open_image
    from clipforge.compress.exported import refuse_export
    from clipforge.encode import embed_images, encode_texts
    from clipforge.errors import ConfigError
    from clipforge.explain import explain_image
    from clipforge.explain.overlay import FORMATS, save_overlay
    from clipforge.explain.scorecam import DEFAULT_WEIGHTING

    note = checked_output(out, inputs=[image, model])
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"--out {out}: unknown image suffix {out.suffix!r}; use one of {', '.join(FORMATS)}")
    refuse_export(model, "explain")
    loaded = load_model(model, config, pretrained, precision, device)
    picture = open_image(image).convert("RGB")
    view, heatmap = explain_image(loaded, picture, text, method, weighting or DEFAULT_WEIGHTING)
    if method == "rollout":
        label = "attention rollout (no text)"
    else:
        cosine = float(embed_images(loaded, [picture], workers=0, progress=False).embeddings[0] @ encode_texts(loaded, [text])[0].numpy())
        label = f"Score-CAM ({weighting or DEFAULT_WEIGHTING}) of \"{text}\" · cosine {cosine:.3f}"
    save_overlay(view, heatmap, out, label=label)
    say(f"wrote {method} map of {image} to {out}{note}")


def parse_numbers(text: str, option: str) -> list[float]:
    """``"1,2,4"`` → [1.0, 2.0, 4.0]; a one-line error naming ``option`` otherwise."""
    from clipforge.errors import InputError

    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise InputError(f"{option}: {text!r} is not a comma-separated list of numbers") from None
