"""``clipforge curate``: DataComp filters, MetaCLIP balancing, deduplication, caption rewrites, resharding and the
report, each step a set of idempotent per-shard tasks run locally or on Ray (``--engine ray [--address]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from clipforge._util.progress import say
from clipforge.cli.options import ConfigOption, PretrainedOption, checked_output
from clipforge.errors import ConfigError, InputError

curate_app = typer.Typer(help="Curate a pool of webdataset shards: filter, balance, dedup, rewrite, reshard, report.", no_args_is_help=True)

PoolArgument = Annotated[list[str], typer.Argument(help="Pool: webdataset .tar shards, brace patterns, or folders of shards.")]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output folder (rerun the same command to resume).")]
EngineOption = Annotated[str, typer.Option(help="local (a process pool) | ray.")]
AddressOption = Annotated[str | None, typer.Option(help="Ray cluster HOST:PORT (default: RAY_ADDRESS, else a local Ray).")]
WorkersOption = Annotated[int | None, typer.Option(min=0, help="Local engine: processes (default: cores - 1).")]
SubsetOption = Annotated[Path | None, typer.Option(help="Only the samples of this subset file (an earlier step's subset.npy).")]
ModelOption = Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint (or config name with --pretrained) for embeddings.")]
PrecisionOption = Annotated[str, typer.Option(help="fp32 | bf16 | fp16.")]


def register(app: typer.Typer) -> None:
    app.add_typer(curate_app, name="curate")


def _engine(engine: str, address: str | None, workers: int | None) -> Any:
    from clipforge.data.curate.engine import Engine

    return Engine(engine, address=address, workers=workers)


def _embedder(model: str | None, config: str | None, pretrained: str | None, precision: str) -> Any:
    if model is None:
        return None
    from functools import partial

    from clipforge.retrieval.embed import model_reference
    from clipforge.retrieval.pool_embeddings import pool_embeddings

    return partial(pool_embeddings, model_reference(model, config, pretrained, precision))


def _set_embeddings(embed: Any, inputs: list[str], out: Path, engine: Any) -> Any:
    """Image embeddings of another set of shards (targets, an evaluation set), through the same store."""
    import numpy as np

    from clipforge.data.curate.pool import pool_shards, scan_pool

    shards = pool_shards(inputs)
    pool = scan_pool(shards, out, engine)
    image, _ = embed(shards, pool, out, engine, captions=False)
    return image[~np.isnan(image).any(axis=1)]


LIST_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".lst", ".list", ".json", ".jsonl")


def _words(value: str | None, option: str) -> list[str]:
    """A list from a file (one per line) or a comma-separated value. A value without commas that looks like a
    path (a path separator or a list file's suffix) but names no file is refused, naming ``option``."""
    if value is None:
        return []
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if "," not in value and (path.name != value or path.suffix.lower() in LIST_FILE_SUFFIXES):
        raise InputError(f"{option} {value}: no such file; give an existing file (one entry per line) or a,b,c")
    return [word.strip() for word in value.split(",") if word.strip()]


def _done(summary: dict[str, Any], out: Path) -> None:
    unreadable = f", {summary['unreadable']} unreadable samples counted" if summary["unreadable"] else ""
    say(f"kept {summary['kept']} of {summary['input']} samples{unreadable}; wrote {out / 'subset.npy'}, decisions.parquet, summary.json")


@curate_app.command("filter")
def filter_command(
    inputs: PoolArgument,
    out: OutOption,
    model: ModelOption = None,
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
    precision: PrecisionOption = "fp32",
    basic: Annotated[bool, typer.Option(help="DataComp's basic filter: caption words/characters, image size and aspect ratio.")] = False,
    min_words: Annotated[int, typer.Option(min=0)] = 3,
    min_chars: Annotated[int, typer.Option(min=0)] = 6,
    min_side: Annotated[int, typer.Option(min=0, help="Shorter image side in pixels.")] = 200,
    max_aspect: Annotated[float, typer.Option(min=1.0)] = 3.0,
    clip_fraction: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Keep the pool's top fraction by CLIP score.")] = None,
    clip_threshold: Annotated[float | None, typer.Option(help="Keep CLIP score >= this.")] = None,
    text_concepts: Annotated[str | None, typer.Option(help="Keep captions naming a concept: a file (one per line) or a,b,c.")] = None,
    image_targets: Annotated[list[str] | None, typer.Option(help="Target shards of the image-based filter (repeatable).")] = None,
    clusters: Annotated[int, typer.Option(min=1, help="k-means clusters of the image-based filter.")] = 100,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    subset: SubsetOption = None,
    engine: EngineOption = "local",
    address: AddressOption = None,
    workers: WorkersOption = None,
) -> None:
    """DataComp's filtering baselines; several filters intersect. Writes subset.npy (DataComp's format)."""
    from clipforge.data.curate.job import curate_filter
    from clipforge.data.curate.steps import FilterSettings

    settings = FilterSettings(basic, min_words, min_chars, min_side, max_aspect, clip_fraction, clip_threshold,
                              tuple(_words(text_concepts, "--text-concepts")), clusters if image_targets else None, seed)
    settings.check()
    checked_output(out, directory=True)
    runner, embed = _engine(engine, address, workers), _embedder(model, config, pretrained, precision)
    targets = _set_embeddings(embed, image_targets, out / "targets", runner) if image_targets and embed else None
    _done(curate_filter(inputs, out, settings, embed=embed, targets=targets, engine=runner, subset=subset), out)


@curate_app.command("balance")
def balance_command(
    inputs: PoolArgument,
    out: OutOption,
    metadata: Annotated[str, typer.Option(help="MetaCLIP metadata entries: a file, one per line (or a,b,c).")],
    t: Annotated[float | None, typer.Option("--t", min=1, help="Max matches per entry (default: from --tail-share).")] = None,
    tail_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of matches held by tail entries that sets t.")] = 0.06,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    subset: SubsetOption = None,
    engine: EngineOption = "local",
    address: AddressOption = None,
    workers: WorkersOption = None,
) -> None:
    """MetaCLIP balancing: keep each pair with probability 1 - prod(1 - t/count) over its matched entries."""
    from clipforge.data.curate.job import curate_balance

    checked_output(out, directory=True)
    summary = curate_balance(inputs, out, _words(metadata, "--metadata"), t=t, tail_share=tail_share, seed=seed,
                             engine=_engine(engine, address, workers), subset=subset)
    say(f"t = {summary['t']:g} (tail share {summary['tail_share']:.3f}); {summary['matched']} samples match an entry")
    _done(summary, out)


@curate_app.command("dedup")
def dedup_command(
    inputs: PoolArgument,
    out: OutOption,
    model: ModelOption = None,
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
    precision: PrecisionOption = "fp32",
    threshold: Annotated[float | None, typer.Option(min=-1.0, max=1.0, help="Near-duplicates: cosine of descriptors >= this.")] = None,
    descriptor: Annotated[str, typer.Option(help="Near-duplicate descriptor: pixels (copy detection, no model) | model (--model's image embeddings).")] = "pixels",
    against: Annotated[list[str] | None, typer.Option(help="Evaluation shards: drop pool images this close to them (repeatable).")] = None,
    against_threshold: Annotated[float, typer.Option(min=-1.0, max=1.0)] = 0.95,
    subset: SubsetOption = None,
    engine: EngineOption = "local",
    address: AddressOption = None,
    workers: WorkersOption = None,
) -> None:
    """Exact duplicates (SHA-256 of the image bytes) and, with --threshold, near-duplicate groups; one kept per group."""
    from clipforge.data.curate.job import curate_dedup

    if descriptor not in ("pixels", "model"):
        raise ConfigError(f"--descriptor {descriptor!r} is not pixels or model")
    if descriptor == "model" and model is None:
        raise ConfigError("--descriptor model compares the model's image embeddings: give --model")
    if descriptor == "pixels" and model is not None:
        raise ConfigError("--model: dedup uses a model only with --descriptor model (pixels needs none); add it or drop --model")
    checked_output(out, directory=True)
    runner = _engine(engine, address, workers)
    if descriptor == "pixels":
        from clipforge.data.curate.descriptors import pixel_embeddings as embed
    else:
        embed = _embedder(model, config, pretrained, precision)
    evaluation = _set_embeddings(embed, against, out / "against", runner) if against else None
    _done(curate_dedup(inputs, out, threshold=threshold, embed=embed, evaluation=evaluation,
                       evaluation_threshold=against_threshold, engine=runner, subset=subset), out)


@curate_app.command("rewrite")
def rewrite_command(
    inputs: PoolArgument,
    out: OutOption,
    rewriter: Annotated[str, typer.Option(help="rules | python:module:function | command:CMD (captions on stdin, JSON lists out).")] = "rules",
    count: Annotated[int, typer.Option(min=1, help="Rewrites per caption (rules).")] = 3,
    engine: EngineOption = "local",
    address: AddressOption = None,
    workers: WorkersOption = None,
) -> None:
    """Copy the shards with a captions.json member of rewrites per sample; training then samples one caption per step."""
    from clipforge.data.curate.job import curate_rewrite
    from clipforge.data.curate.rewrite import parse_rewriter

    parsed = parse_rewriter(rewriter, count)
    checked_output(out, directory=True)
    written = curate_rewrite(inputs, out, parsed, engine=_engine(engine, address, workers))
    say(f"wrote {len(written)} multi-caption shards to {out}")


@curate_app.command("reshard")
def reshard_command(
    inputs: PoolArgument,
    subset: Annotated[Path, typer.Option(help="Subset file (DataComp's sorted u8,u8 uid array).")],
    out: OutOption,
    shard_size: Annotated[int, typer.Option(min=1)] = 10_000,
    engine: EngineOption = "local",
    address: AddressOption = None,
    workers: WorkersOption = None,
) -> None:
    """Write the subset's samples as new shards (every member copied), plus sizes.json."""
    from clipforge.data.curate.job import curate_reshard

    checked_output(out, directory=True)
    sizes = curate_reshard(inputs, subset, out, shard_size=shard_size, engine=_engine(engine, address, workers))
    say(f"wrote {sum(sizes.values())} samples in {len(sizes)} shards to {out}")


@curate_app.command("report")
def report_command(
    step: Annotated[Path, typer.Argument(help="Output folder of curate filter, balance or dedup.")],
    out: OutOption,
    concepts: Annotated[str | None, typer.Option(help="Concepts to histogram: a file (one per line) or a,b,c (default: frequent words).")] = None,
) -> None:
    """report.md and report.html: kept counts per criterion, unreadable samples, concept histograms, example grid."""
    from clipforge.data.curate.report import write_report

    checked_output(out, directory=True)
    figures = write_report(step, out, _words(concepts, "--concepts") or None)
    say(f"kept {figures['kept']} of {figures['input']}; wrote {out / 'report.md'} and {out / 'report.html'}")
