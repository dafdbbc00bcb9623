"""``clipforge embed``: images, folders, manifests or shards → embeddings.

``--out FILE.parquet`` writes one table ``source | embedding``; any other ``--out`` is an embedding
store directory in clip-retrieval's layout, written in resumable parts (``clipforge.retrieval.embed``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from clipforge._util.progress import say, warn
from clipforge.cli.options import (
    BatchSizeOption,
    CompressOption,
    ConfigOption,
    DeviceOption,
    ModelOption,
    PretrainedOption,
    TomeOption,
    WorkersOption,
    checked_output,
    compression_options,
    load_model,
)


def register(app: typer.Typer) -> None:
    app.command("embed")(embed_command)


def embed_command(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively), manifests (.csv/.tsv/.parquet/.jsonl), webdataset .tar shards (or a folder of them), or strings with --text.")],
    model: ModelOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .parquet file, or a directory for an embedding store.")],
    text: Annotated[bool, typer.Option("--text", help="Treat the inputs as strings to embed (.parquet output).")] = False,
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp16. bf16 is several times faster on CPUs with AVX512-BF16/AMX and on GPUs.")] = "fp32",
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first unreadable image instead of skipping it.")] = False,
    captions: Annotated[bool, typer.Option(help="Store: also embed each image's caption (.txt beside it, manifest column, shard .txt).")] = False,
    part_size: Annotated[int, typer.Option(min=1, help="Store: images per part of a folder or manifest (a shard is one part).")] = 10_000,
    image_column: Annotated[str | None, typer.Option(help="Manifest column of image paths (default: image_path, filepath, path, image or file).")] = None,
    caption_column: Annotated[str | None, typer.Option(help="Manifest column of captions (default: caption, text or title).")] = None,
    device: DeviceOption = "auto",
    engine: Annotated[str | None, typer.Option(help="Store: run the parts as tasks on local (a process pool) or ray (default: this process, or torchrun's ranks).")] = None,
    address: Annotated[str | None, typer.Option(help="Store with --engine ray: the cluster's HOST:PORT (default: RAY_ADDRESS, else a local Ray).")] = None,
    tome: TomeOption = None,
    compress: CompressOption = None,
) -> None:
    """Embed images or strings; each row keeps its source. Unreadable images are skipped and listed.

    A store directory is written part by part: rerunning the same command after a crash does only the
    missing parts, and under torchrun each rank (RANK/WORLD_SIZE) does its share of the parts.
    """
    from clipforge.encode import default_workers
    from clipforge.errors import ConfigError

    workers = default_workers() if workers is None else workers
    steps = compression_options(tome, compress)
    if out.suffix.lower() == ".parquet":
        note = checked_output(out, inputs=[model] if text else [model, *inputs])
        count, dim, skipped = _embed_to_parquet(inputs, model, out, text, config, pretrained, precision, batch_size, workers, strict, device, steps)
        say(f"wrote {count} embeddings of dimension {dim} to {out}{note}" + (f"; {skipped} images skipped" if skipped else ""))
        return
    if text:
        raise ConfigError(f"--out {out}: --text writes a .parquet file; for a store of captions use a manifest with --captions")
    if steps:
        raise ConfigError(
            f"--out {out}: a store records how to load its model, so --tome/--compress cannot apply here; write a "
            f"compressed checkpoint first (clipforge compress tome --model {model} --out compressed.safetensors) and embed with it"
        )
    from clipforge.retrieval.embed import (
        distributed_rank,
        embed_to_store,
        load_model,
        model_reference,
    )

    checked_output(out, directory=True, inputs=[model, *inputs])
    reference = model_reference(model, config, pretrained, precision)
    if engine is not None or address is not None:
        _embed_on_engine(reference, inputs, out, engine or "ray", address, workers, part_size=part_size, batch_size=batch_size, captions=captions)
        return
    loaded = load_model(reference, device=device)
    rank, world_size = distributed_rank()
    report = embed_to_store(
        loaded, reference, inputs, out, part_size=part_size, batch_size=batch_size, workers=workers, strict=strict,
        captions=captions, image_column=image_column, caption_column=caption_column, rank=rank, world_size=world_size,
    )
    for _, reason in [*report.unreadable_folders, *report.skipped]:
        warn("skipped", reason)
    share = f" (rank {rank} of {world_size})" if world_size > 1 else ""
    folders = f", {len(report.unreadable_folders)} unreadable folders" if report.unreadable_folders else ""
    say(
        f"wrote {report.rows} embeddings in {len(report.written)} parts to {out}{share}; "
        f"{len(report.already_done)} parts were already done, {len(report.skipped)} images skipped{folders}; "
        f"the job has {report.num_parts} parts"
    )


def _embed_on_engine(reference: dict[str, Any], inputs: list[str], out: Path, engine: str, address: str | None, workers: int,
                     **settings: Any) -> None:
    """The store's parts as idempotent tasks on the curation engine: task r of R embeds parts r, r + R, ..."""
    from clipforge.data.curate.engine import Engine
    from clipforge.data.curate.pool import run_task
    from clipforge.retrieval.embed import store_info
    from clipforge.retrieval.pool_embeddings import store_tasks

    runner = Engine(engine, address=address, workers=workers if engine == "local" else None)
    rows = sum(runner.map(run_task, store_tasks(reference, inputs, out, runner, **settings)))
    say(f"wrote {rows} embeddings to {out} on the {engine} engine; the job has {store_info(out)['num_parts']} parts")


def _embed_to_parquet(
    inputs: list[str], model: str, out: Path, text: bool, config: str | None, pretrained: str | None,
    precision: str, batch_size: int, workers: int, strict: bool, device: str, steps: list[dict[str, Any]],
) -> tuple[int, int, int]:
    """Embed and write the parquet file; the number of rows, their dimension and the images skipped."""
    from clipforge.encode import embed_images, embed_texts
    from clipforge.retrieval.inputs import collect_image_paths, write_embeddings

    loaded = load_model(model, config, pretrained, precision, device, steps)
    skipped = 0
    if text:
        sources = list(inputs)
        vectors = embed_texts(loaded, sources, batch_size=batch_size)
    else:
        unreadable: list[tuple[str, str]] = []
        sources = [str(p) for p in collect_image_paths(inputs, None if strict else unreadable)]
        result = embed_images(loaded, sources, batch_size=batch_size, workers=workers, strict=strict)
        for _, reason in [*unreadable, *result.skipped]:
            warn("skipped", reason)
        skipped = len(unreadable) + len(result.skipped)
        sources, vectors = [sources[i] for i in result.kept], result.embeddings
    write_embeddings(out, sources, vectors, model=str(model), kind="text" if text else "image")
    return len(sources), vectors.shape[1], skipped
