"""``clipforge embed``: images, folders or strings → embeddings with their source, in one parquet file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipforge.progress import console, error_console


def register(app: typer.Typer) -> None:
    app.command("embed")(embed_command)


def embed_command(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively), or strings with --text.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint, Hugging Face directory or config name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .parquet file.")],
    text: Annotated[bool, typer.Option("--text", help="Treat the inputs as strings to embed.")] = False,
    config: Annotated[str | None, typer.Option(help="Config for a bare state dict.")] = None,
    pretrained: Annotated[str | None, typer.Option(help="open_clip pretrained tag when --model is a config name.")] = None,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp16.")] = "fp32",
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    workers: Annotated[int | None, typer.Option(min=0, help="Decoding processes (default: cores - 1).")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first unreadable image instead of skipping it.")] = False,
) -> None:
    """Embed images or strings; each row keeps its source. Unreadable images are skipped and listed."""
    import clipforge
    from clipforge.embed_io import collect_image_paths, write_embeddings
    from clipforge.inference import embed_images, embed_texts

    loaded = clipforge.load(model, config=config, precision=precision, pretrained=pretrained)
    if text:
        sources = list(inputs)
        vectors = embed_texts(loaded, sources, batch_size=batch_size)
    else:
        sources = [str(p) for p in collect_image_paths(inputs)]
        result = embed_images(loaded, sources, batch_size=batch_size, workers=workers, strict=strict)
        for _, reason in result.skipped:
            error_console.print(f"[yellow]skipped:[/] {reason}", highlight=False)
        sources, vectors = [sources[i] for i in result.kept], result.embeddings
    write_embeddings(out, sources, vectors, model=str(model), kind="text" if text else "image")
    console.print(f"wrote {len(sources)} embeddings of dimension {vectors.shape[1]} to {out}")
