"""``clipforge models``, ``clipforge info`` and ``clipforge convert``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipforge._util.progress import console, say
from clipforge.cli.options import checked_checkpoint, checked_output, load_model
from clipforge.cli.tables import table as table_of

BareConfigOption = Annotated[str | None, typer.Option(help="Config for a bare state dict (e.g. ViT-B-32-quickgelu).")]


def register(app: typer.Typer) -> None:
    app.command("models")(list_models_command)
    app.command("info")(info_command)
    app.command("convert")(convert_command)


def list_models_command(
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Also list the known pretrained tags.")] = False,
) -> None:
    """List model configs (and, with --pretrained, the open_clip weights clipforge can fetch)."""
    from clipforge.config import get_model_config, list_models
    from clipforge.io.pretrained import pretrained_table

    table = table_of("config", "act", "image", "patch", "vision", "text", "embed", "tags")
    table.columns[0].no_wrap = True
    tags = pretrained_table()
    for name in list_models():
        cfg = get_model_config(name)
        table.add_row(
            name,
            cfg.activation,
            str(cfg.vision.image_size),
            str(cfg.vision.patch_size),
            f"{cfg.vision.width}×{cfg.vision.layers}",
            f"{cfg.text.width}×{cfg.text.layers}",
            str(cfg.embed_dim),
            str(len(tags.get(name, {}))),
        )
    console.print(table)
    if pretrained:
        console.print("\n[bold]pretrained tags[/] (clipforge.load(config, pretrained=tag)):")
        for name, known in tags.items():  # wrapped at the terminal's width, between tags
            console.print(f"{name}: {', '.join(known)}", markup=False, highlight=False)


def info_command(
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint file, Hugging Face or export directory, or config name.")],
    config: BareConfigOption = None,
) -> None:
    """Show what a checkpoint or export holds: architecture, activation, preprocessing, provenance and size (an
    export: its engine, the graphs that run and their precision, and the embedding size)."""
    import json

    from clipforge.compress.exported import ExportedCLIP
    from clipforge.compress.records import compression_steps, describe_steps

    model = load_model(checkpoint, config)
    described = {
        "source": str(checkpoint),
        "config": model.config.to_dict(),
        "preprocess": model.preprocess_cfg.to_dict(),
        "provenance": model.provenance,
        "compression": describe_steps(compression_steps(model)) or None,
    }
    if isinstance(model, ExportedCLIP):
        described["export"] = {"engine": model.engine, "runs": model.runs, "variants": model.variants, "embed_dim": model.config.embed_dim}
    else:
        counts = {name: p.numel() for name, p in model.named_parameters()}
        visual = sum(n for name, n in counts.items() if name.startswith("visual."))
        head = sum(n for name, n in counts.items() if name.startswith("logit_"))
        described["parameters"] = {"total": sum(counts.values()), "image": visual, "text": sum(counts.values()) - visual - head}
    console.print_json(json.dumps(described))


def convert_command(
    source: Annotated[str, typer.Argument(help="Any checkpoint clipforge loads (not an ONNX/OpenVINO export).")],
    destination: Annotated[Path, typer.Argument(help="Output .safetensors file (clipforge) or directory (hf).")],
    to: Annotated[str, typer.Option(help="Output format: clipforge | hf (hf: uncompressed checkpoints only).")] = "clipforge",
    config: BareConfigOption = None,
) -> None:
    """Convert between clipforge, open_clip, OpenAI and Hugging Face formats."""
    import clipforge
    from clipforge.compress.exported import refuse_export
    from clipforge.compress.records import compression_steps, describe_steps
    from clipforge.errors import ConfigError
    from clipforge.io.hf import save_hf

    if to not in ("clipforge", "hf"):
        raise ConfigError(f"--to: {to!r} is not one of clipforge, hf")
    refuse_export(source, "convert")
    if to == "hf":
        note = checked_output(destination, directory=True, option="DESTINATION", inputs=[source])
    else:
        note = checked_checkpoint(destination, option="DESTINATION", inputs=[source])
    model = load_model(source, config)
    if to == "hf" and (steps := compression_steps(model)):
        raise ConfigError(
            f"{source}: records {describe_steps(steps)}, which a Hugging Face directory cannot hold; convert the "
            "checkpoint it was compressed from, or keep the record with --to clipforge"
        )
    written = clipforge.save(model, destination) if to == "clipforge" else save_hf(model, destination)
    say(f"wrote {written}{note}")
