"""``clipforge data``: materialise the synthetic world, reinforce shards with teachers (MobileCLIP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipforge._util.progress import say, warn
from clipforge.cli.options import checked_output

data_app = typer.Typer(help="Data: write the synthetic world as webdataset shards; reinforce shards with teachers.", no_args_is_help=True)


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
    image_format: Annotated[str, typer.Option("--format", help="png | jpg.")] = "png",
    shift: Annotated[str | None, typer.Option(help=(  # written out (tests/test_data_cli.py checks them): importing the synthetic package slows every start by 0.2 s
        "A distribution shift: none, stripes, checker, dots, outline, checkerboard_background, clutter_background, "
        "gaussian_noise, gaussian_blur, pixelate, contrast, jpeg."))] = None,
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


@data_app.command("reinforce")
def reinforce_command(
    inputs: Annotated[list[str], typer.Argument(help="Webdataset .tar shards, brace patterns or folders of shards.")],
    teacher: Annotated[list[str], typer.Option(help="Teacher checkpoint (repeat for an ensemble).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: reinforced shards with the same names.")],
    augmentations: Annotated[int, typer.Option(min=1, help="Stored random crops per image (MobileCLIP: 10–30).")] = 5,
    captions: Annotated[str, typer.Option(help="Extra captions: synthetic (the synthetic world's paraphrases), json:FIELD (a list in each sample's .json) or none.")] = "synthetic",
    caption_count: Annotated[int, typer.Option(min=0, help="Extra captions per image (MobileCLIP: 5).")] = 5,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the crops (a rerun draws the same).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
) -> None:
    """Store teachers' embeddings of N crops and several captions beside each image (MobileCLIP).

    Training on the output never runs a teacher. Rerunning skips finished shards.
    """
    from clipforge.cli.options import load_model
    from clipforge.distill.reinforce import reinforce

    checked_output(out, directory=True, inputs=inputs)
    models = [load_model(path) for path in teacher]
    report = reinforce(
        models, teacher, inputs, out, augmentations=augmentations, captions=captions, caption_count=caption_count,
        seed=seed, batch_size=batch_size,
    )
    for reason in report.skipped[:5]:
        warn("skipped", reason)
    say(
        f"{report.samples} samples in {len(report.written)} shards written under {out} "
        f"({len(report.already_done)} already complete, {len(report.skipped)} samples skipped) in {report.wall_s:.0f} s"
    )
