"""``clipforge compress``: token merging and pruning, bf16, int8, ONNX and OpenVINO exports, early-exit heads, and a report of what each costs.

``compress tome|pitome|evit|bf16|int8`` records the method and its settings in the output checkpoint, so
``clipforge.load`` (and every command) restores it; applied to a compressed checkpoint they stack (one token
reduction and one number format per model). ``embed`` and ``eval`` take the same methods as ``--tome R`` and
``--compress METHOD:key=value`` (``clipforge.cli.options.compression_options``).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from clipforge._util.progress import console, say
from clipforge.cli.options import (
    BatchSizeOption,
    CheckpointOut,
    ConfigOption,
    ModelOption,
    PretrainedOption,
    SamplesOption,
    SetOption,
    TomeOption,
    checked_checkpoint,
    checked_output,
    compression_options,
    load_model,
)
from clipforge.cli.tables import table as table_of

compress_app = typer.Typer(
    help="Make a model cheaper (token merging/pruning, bf16, int8, ONNX, OpenVINO, early exit) and measure what it costs.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(compress_app, name="compress")


def _compress(method: str, options: dict[str, Any], set_: list[str] | None, model: str, out: Path, config: str | None, pretrained: str | None) -> None:
    """Apply ``method`` with the given options and ``--set`` settings on top of ``model``'s steps; save and summarise."""
    import clipforge
    from clipforge.compress.records import (
        apply_compression,
        compression_steps,
        describe_steps,
        parse_settings,
    )
    from clipforge.compress.reduction.registry import METHODS as TOKEN_REDUCTIONS
    from clipforge.compress.reduction.registry import estimate_flops, token_counts
    from clipforge.errors import ConfigError
    from clipforge.models.vit import image_tower

    given = {key: value for key, value in options.items() if value is not None}
    extra = parse_settings(set_ or [], "--set")
    if twice := sorted(set(given) & set(extra)):
        raise ConfigError(f"--set {twice[0]}: also given as --{twice[0].replace('_', '-')}; give it once")
    note = checked_checkpoint(out, inputs=[model])
    loaded = _load_pytorch(model, config, pretrained)
    base_flops, base_counts = estimate_flops(loaded), token_counts(loaded)
    compressed = apply_compression(loaded, method, **given, **extra)
    flops = estimate_flops(compressed)
    if method in TOKEN_REDUCTIONS:
        # A class-token tower runs its last block on the class token alone: a reduction there changes nothing.
        compared = slice(0, -1) if image_tower(loaded).cfg.pool_type == "tok" else slice(None)
        if token_counts(compressed)[compared] == base_counts[compared]:
            raise ConfigError(
                f"{method}: these settings remove no tokens before the last image block (the only one whose "
                "reduction could not change the embedding); say how many to remove (tome --r R, pitome --keep-ratio K < 1, "
                "evit --set layers=[...])"
            )
    clipforge.save(compressed, out, provenance={"compressed_from": str(model)})
    say(f"wrote {out}{note}: {describe_steps(compression_steps(compressed))}")
    if method in TOKEN_REDUCTIONS:
        counts = token_counts(compressed)
        say(f"tokens entering each image block: {counts[:-1]}; image-block FLOPs {flops / base_flops:.2f}x of the base model")


def _load_pytorch(model: str, config: str | None, pretrained: str | None, steps: Sequence[dict[str, Any]] = ()) -> Any:
    """``load_model`` (with ``steps`` on top), refused in one line when ``model`` is an ONNX or OpenVINO export:
    compressing, exporting and training exit heads need the PyTorch model."""
    from clipforge.compress.exported import refuse_export

    refuse_export(model, "compress")
    return load_model(model, config, pretrained, steps=steps)


def _load_uncompressed(model: str, config: str | None, pretrained: str | None, instead: str) -> Any:
    """The PyTorch model, refused (``instead`` says what to do) when it records compression steps."""
    from clipforge.compress.records import compression_steps, describe_steps
    from clipforge.errors import ConfigError

    loaded = _load_pytorch(model, config, pretrained)
    if steps := compression_steps(loaded):
        raise ConfigError(f"--model {model}: records {describe_steps(steps)}; {instead}")
    return loaded


@compress_app.command("tome")
def tome_command(
    model: ModelOption,
    out: CheckpointOut,
    r: Annotated[int | None, typer.Option("--per-block", "-r", "--r", min=0, help="Tokens merged per block (ToMe's r); a per-block list with --set r=[...]. (--r: the earlier spelling.)")] = None,
    inflect: Annotated[float | None, typer.Option(help="Schedule: 0 constant, -1 decreasing from 2r to 0 (ToMe's parse_r).")] = None,
    set_: SetOption = None,
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
) -> None:
    """ToMe (Bolya et al., ICLR 2023): merge the r most similar token pairs in every image block."""
    _compress("tome", {"r": r, "inflect": inflect}, set_, model, out, config, pretrained)


@compress_app.command("pitome")
def pitome_command(
    model: ModelOption,
    out: CheckpointOut,
    keep_ratio: Annotated[float | None, typer.Option(help="Share of tokens each block keeps (PiToMe's ratio, e.g. 0.9).")] = None,
    margin: Annotated[float | None, typer.Option(help="Energy margin at the first block, decaying to 0 with depth.")] = None,
    set_: SetOption = None,
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
) -> None:
    """PiToMe (Tran et al., NeurIPS 2024): merge high-energy tokens, protect isolated ones."""
    _compress("pitome", {"keep_ratio": keep_ratio, "margin": margin}, set_, model, out, config, pretrained)


@compress_app.command("evit")
def evit_command(
    model: ModelOption,
    out: CheckpointOut,
    keep_rate: Annotated[float | None, typer.Option(help="Share of patch tokens kept at each reduction block (default 0.7).")] = None,
    set_: SetOption = None,
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
) -> None:
    """EViT (Liang et al., ICLR 2022): keep the tokens the class token attends to most, fuse the rest (--set layers=[...])."""
    _compress("evit", {"keep_rate": keep_rate}, set_, model, out, config, pretrained)


@compress_app.command("bf16")
def bf16_command(model: ModelOption, out: CheckpointOut, config: ConfigOption = None, pretrained: PretrainedOption = None) -> None:
    """bfloat16 weights and activations (several times faster on CPUs with AVX512-BF16 or AMX, and on GPUs)."""
    _compress("bf16", {}, None, model, out, config, pretrained)


@compress_app.command("int8")
def int8_command(
    model: ModelOption,
    out: CheckpointOut,
    per_tensor: Annotated[bool, typer.Option(help="One weight scale per layer instead of per output channel.")] = False,
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
) -> None:
    """Dynamic int8 (torch.ao, CPU): every linear layer of both towers in int8; the checkpoint keeps float weights."""
    _compress("int8-dynamic", {"per_channel": False if per_tensor else None}, None, model, out, config, pretrained)


ExportOut = Annotated[Path, typer.Option("--out", "-o", help="Output directory (clipforge.load reads it as a model).")]


def _export(engine: str, model: str, out: Path, tome: int | None, config: str | None, pretrained: str | None, write: Any) -> None:
    """Load ``model`` (with its recorded steps, plus ``--tome``), ``write(model)`` the export, check it, summarise.

    A failed export or check removes the directories it created: no empty or partial export is left."""
    from clipforge.compress.exported import check_export
    from clipforge.compress.records import compression_steps, describe_steps

    checked_output(out, directory=True, inputs=[model])
    loaded = _load_pytorch(model, config, pretrained, compression_options(tome, None))
    created = [path for path in (out, *out.parents) if not path.exists()]
    try:
        write(loaded)
        checks = check_export(loaded, out)
    except BaseException:
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        raise
    for check in checks:
        say(f"{engine} {check.label}: max |export - torch| {check.max_abs_difference:.2e}, min cosine {check.min_cosine:.5f}")
    steps = compression_steps(loaded)
    say(f"wrote {out}" + (f" ({describe_steps(steps)} in the graphs)" if steps else "") + f"; use it as --model {out}")


@compress_app.command("onnx")
def onnx_command(
    model: ModelOption,
    out: ExportOut,
    int8: Annotated[bool, typer.Option(help="Also write *.int8.onnx (onnxruntime dynamic int8) and load those by default.")] = False,
    tome: TomeOption = None,
    opset: Annotated[int, typer.Option(min=14, help="ONNX opset: 14 up to the highest the installed torch's TorchScript exporter supports (torch.onnx; a higher one is refused, naming the range).")] = 17,
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
) -> None:
    """Export both towers to ONNX (dynamic batch and text length) for onnxruntime; check them against PyTorch."""
    from clipforge.compress.export_onnx import check_opset, export_onnx

    check_opset(opset)  # before the model loads
    _export("onnx", model, out, tome, config, pretrained, lambda loaded: export_onnx(loaded, out, opset, int8=int8))


@compress_app.command("openvino")
def openvino_command(
    model: ModelOption,
    out: ExportOut,
    int8: Annotated[bool, typer.Option(help="Also write NNCF post-training int8 IR (needs --calibration) and load it by default.")] = False,
    calibration: Annotated[str | None, typer.Option("--calibration", metavar="DATA", help="Calibration images and prompts for --int8: any eval --data (synthetic:TASK, folder, table, shards).")] = None,
    samples: Annotated[int, typer.Option(min=1, help="Calibration images (NNCF's default subset is 300).")] = 256,
    tome: TomeOption = None,
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
) -> None:
    """Export both towers to OpenVINO IR (dynamic batch and text length), int8 with NNCF; check them against PyTorch."""
    from clipforge.compress.export_openvino import (
        calibration_set,
        export_openvino,
        require_openvino,
    )
    from clipforge.errors import ConfigError

    require_openvino()
    if int8 and calibration is None:
        raise ConfigError("--int8: NNCF needs calibration data; add --calibration DATA (e.g. synthetic:shape or a folder of images)")
    if calibration is not None and not int8:
        raise ConfigError("--calibration: only int8 export calibrates; add --int8, or drop --calibration")

    def write(loaded: Any) -> None:
        images, texts = calibration_set(loaded, calibration, samples) if int8 else (None, None)
        export_openvino(loaded, out, int8=int8, calibration_images=images, calibration_texts=texts, progress=True)

    _export("openvino", model, out, tome, config, pretrained, write)


@compress_app.command("early-exit")
def early_exit_command(
    model: ModelOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file of exit heads (with the threshold).")],
    data: Annotated[str, typer.Option("--data", "-d", help="synthetic[:task] (heads trained on its train split) or any eval --data (split in halves).")] = "synthetic:shape",
    steps: Annotated[int, typer.Option(min=1, help="Training steps.")] = 4000,
    batch_size: BatchSizeOption = 32,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Exit when the zero-shot max probability exceeds it.")] = 0.8,
    samples: Annotated[int, typer.Option(min=4, help="Test images of a synthetic task.")] = 1000,
    train_samples: Annotated[int, typer.Option(min=4, help="Train-split samples of a synthetic task to fit on.")] = 16000,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs of each test batch under both (medians).")] = 5,
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
) -> None:
    """LGViT-style exit heads, self-distilled on the frozen model; reports accuracy and the average depth used."""
    from clipforge.compress.early_exit import (
        evaluate_early_exit,
        fit_exit_heads,
        save_exit_heads,
    )
    from clipforge.eval.datasets import load_dataset
    from clipforge.eval.runner import Evaluator
    from clipforge.eval.tasks import split_in_two

    note = checked_checkpoint(out, inputs=[model])
    loaded = _load_pytorch(model, config, pretrained)
    dataset = load_dataset(data, samples=samples)
    fit, test = (dataset.synthetic.dataset("train", train_samples), dataset) if dataset.synthetic else split_in_two(dataset)
    bank = Evaluator(loaded, batch_size=batch_size, workers=0).classifier(test)
    heads = fit_exit_heads(loaded, fit, bank, steps=steps, batch_size=batch_size, lr=lr, progress=True)
    result = evaluate_early_exit(loaded, heads, test, bank, threshold, batch_size=batch_size, repeats=repeats)
    save_exit_heads(heads, out, threshold)
    depth, blocks = result.average_depth, result.blocks
    table = table_of("", "accuracy", "agrees with full", "blocks run", "wall time", title=escape(f"early exit on {result.dataset}"))
    table.add_row("full model", f"{100 * result.full_accuracy:.1f}%", "100.0%", f"{blocks}", f"{result.full_seconds:.2f} s")
    table.add_row(f"exit heads {result.exit_layers}, threshold {threshold}", f"{100 * result.accuracy:.1f}%",
                  f"{100 * result.agreement:.1f}%", f"{depth:.2f} ({depth / blocks:.0%})",
                  f"{result.seconds:.2f} s ({result.speedup:.2f}x)")
    console.print(table)
    say(f"wrote {out}{note}")


@compress_app.command("report")
def report_command(
    model: ModelOption,
    task: Annotated[str, typer.Option(help="Zero-shot task of the synthetic world (shape, color, count, position, ...).")] = "shape",
    data: Annotated[str | None, typer.Option("--data", "-d", help="Instead of --task: any eval --data (folder, table, shards).")] = None,
    variant: Annotated[list[str] | None, typer.Option("--variant", help="A variant instead of the default set, e.g. bf16+tome:r=8 (repeatable).")] = None,
    samples: SamplesOption = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per timed encode_image call.")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="Timed rounds (medians).")] = 5,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for report.json and speed_accuracy.png.")] = Path("compress_report"),
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
) -> None:
    """One table of compressed variants: images/s, FLOPs, zero-shot accuracy, agreement with the base model, cosine."""
    import torch

    from clipforge.compress.study import (
        Variant,
        compare_variants,
        default_variants,
        write_report,
    )
    from clipforge.eval.datasets import load_dataset

    checked_output(out, directory=True, inputs=[model])
    loaded = _load_uncompressed(model, config, pretrained, "the report compares variants of the uncompressed model")
    dataset = load_dataset(data or f"synthetic:{task}", samples=samples)
    variants = [Variant.parse(spec) for spec in variant] if variant else default_variants(loaded)
    results = compare_variants(loaded, dataset, variants, batch_size=batch_size, repeats=repeats)
    title = f"{loaded.config.name} on {dataset.name} ({len(dataset)} images, batch {batch_size})"
    details = {"model": str(model), "dataset": dataset.name, "images": len(dataset), "batch_size": batch_size,
               "repeats": repeats, "torch_threads": torch.get_num_threads()}
    json_path, plot_path = write_report(results, out, title=title, details=details)
    table = table_of("variant", title=escape(title))
    for column in ("img/s", "speed", "FLOPs", "acc", "Δacc", "agree", "cosine"):
        table.add_column(column, justify="right", no_wrap=True)
    base = results[0]
    for row in results:
        table.add_row(escape(row.name), f"{row.images_per_s:.0f}", f"{row.speedup:.2f}x", f"{row.relative_flops:.2f}x",
                      f"{100 * row.accuracy:.1f}%", f"{100 * (row.accuracy - base.accuracy):+.1f}", f"{100 * row.agreement:.1f}%",
                      f"{row.cosine:.4f}")
    console.print(table)
    say(f"report: {json_path}, plot: {plot_path}")
