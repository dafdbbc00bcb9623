"""``clipforge data``: materialise the synthetic world (and, later, curate datasets)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipforge._util.progress import say
from clipforge.cli.options import checked_output

data_app = typer.Typer(help="Data: write the synthetic world as webdataset shards.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.command("synth")
def synth_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for shards and index.parquet.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of samples.")] = 10_000,
    split: Annotated[str, typer.Option(help="train | val | test | test_heldout | test_ood | test_fewshot.")] = "train",
    seed: Annotated[int, typer.Option(help="World seed: sample i of a split is a pure function of (seed, split, i).")] = 0,
    image_size: Annotated[int, typer.Option(min=32)] = 64,
    shard_size: Annotated[int, typer.Option(min=1)] = 1000,
    image_format: Annotated[str, typer.Option("--format", help="png | jpg | webp.")] = "png",
    shift: Annotated[str | None, typer.Option(help="A distribution shift, e.g. outline, noise_background, gaussian_noise.")] = None,
    caption_noise: Annotated[float, typer.Option(min=0.0, max=1.0, help="Fraction of captions replaced by wrong ones.")] = 0.0,
    duplicates: Annotated[float, typer.Option(min=0.0, max=0.9, help="Fraction of samples that repeat earlier ones.")] = 0.0,
    zipf: Annotated[float, typer.Option(min=0.0, help="Long-tail exponent over concepts (0: uniform).")] = 0.0,
) -> None:
    """Write N synthetic image-caption samples as webdataset shards (img2dataset layout) plus a parquet index.

    Rerunning skips complete shards, so an interrupted job resumes.
    """
    from clipforge.data.synthetic import SyntheticWorld, WorldConfig, write_shards

    checked_output(out, directory=True)
    world = SyntheticWorld(
        WorldConfig(seed=seed, image_size=image_size, caption_noise_rate=caption_noise, duplicate_rate=duplicates, zipf_exponent=zipf)
    )
    summary = write_shards(world, split, n, out, shard_size, image_format=image_format, shift=shift, progress=True)
    say(
        f"{split}: {n} samples in {len(summary['written']) + len(summary['skipped'])} shards under {out} "
        f"({len(summary['written'])} written, {len(summary['skipped'])} already complete)"
    )
