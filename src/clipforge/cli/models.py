"""``clipforge models``, ``clipforge info`` and ``clipforge convert``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipforge._util.progress import console, say
from clipforge.cli.options import checked_output, load_model
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
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint file, Hugging Face directory or config name.")],
    config: BareConfigOption = None,
) -> None:
    """Show what a checkpoint holds: architecture, activation, preprocessing, provenance and size."""
    import json

    from clipforge.compress.records import compression_steps, describe_steps

    model = load_model(checkpoint, config)
    counts = {name: p.numel() for name, p in model.named_parameters()}
    visual = sum(n for name, n in counts.items() if name.startswith("visual."))
    head = sum(n for name, n in counts.items() if name.startswith("logit_"))
    console.print_json(
        json.dumps(
            {
                "source": str(checkpoint),
                "config": model.config.to_dict(),
                "preprocess": model.preprocess_cfg.to_dict(),
                "provenance": model.provenance,
                "compression": describe_steps(compression_steps(model)) or None,
                "parameters": {"total": sum(counts.values()), "image": visual, "text": sum(counts.values()) - visual - head},
            }
        )
    )


def convert_command(
    source: Annotated[str, typer.Argument(help="Any checkpoint clipforge loads.")],
    destination: Annotated[Path, typer.Argument(help="Output .safetensors file (clipforge) or directory (hf).")],
    to: Annotated[str, typer.Option(help="Output format: clipforge | hf.")] = "clipforge",
    config: BareConfigOption = None,
) -> None:
    """Convert between clipforge, open_clip, OpenAI and Hugging Face formats."""
    import clipforge
    from clipforge.errors import ConfigError
    from clipforge.io.hf import save_hf

    if to not in ("clipforge", "hf"):
        raise ConfigError(f"--to: {to!r} is not one of clipforge, hf")
    note = checked_output(destination, directory=to == "hf", option="DESTINATION", inputs=[source])
    model = load_model(source, config)
    written = clipforge.save(model, destination) if to == "clipforge" else save_hf(model, destination)
    say(f"wrote {written}{note}")
