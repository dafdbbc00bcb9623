"""``clipforge index``, ``search`` and ``serve``: build the index of an embedding store, query it, serve it.

``index DIR`` on a store (written by ``clipforge embed --out DIR``) chooses, builds and tunes its faiss
index; on a plain photo folder it first brings the folder's own store (``DIR/.clipforge``) up to date,
embedding only new photos (``clipforge.retrieval.photos``). ``search`` and ``serve`` accept either kind of DIR and
load the model recorded in the store unless ``--model`` is given; ``search`` in a photo folder (the current one
by default, or any folder inside it) refreshes the folder's store first, as rclip does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from clipforge._util.progress import console, log_line, say, warn
from clipforge.cli.options import (
    BatchSizeOption,
    ConfigOption,
    DeviceOption,
    PretrainedOption,
    WorkersOption,
    checked_output,
)
from clipforge.errors import ConfigError, InputError

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

StoreModelOption = Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint or Hugging Face directory (default: the model recorded in the store).")]
StorePrecisionOption = Annotated[str | None, typer.Option(help="fp32 | bf16 | fp16 (default: the store's, or fp32 with --model).")]


def _checked_kind(kind: str) -> str:
    """``--kind``: one of the kinds of embeddings a store holds."""
    from clipforge.retrieval.store import KINDS

    if kind not in KINDS:
        raise typer.BadParameter(f"{kind!r} is not one of {', '.join(KINDS)}")
    return kind


KindOption = Annotated[str, typer.Option(callback=_checked_kind, help="Which embeddings to search: img, or text (captions).")]
ExcludeDirOption = Annotated[
    list[str] | None, typer.Option("--exclude-dir", help="Photo folders: leave out folders of this name (repeatable; hidden folders always are).")
]


def register(app: typer.Typer) -> None:
    app.command("index")(index_command)
    app.command("search")(search_command)
    app.command("serve")(serve_command)


def _passive_openmp() -> None:
    """Before faiss or torch start their OpenMP threads: on a busy machine, spinning threads starve each other."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def parse_size(text: str, option: str) -> int:
    """Bytes from "4GB", "512MiB", "1.5 GB" or a plain number; ``option`` names the option in errors."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in SIZE_UNITS:
        raise ConfigError(f"{option} {text!r}: expected a size such as 4GB, 512MiB or 2000000000")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def _model_reference(store: Path | None, model: str | None, config: str | None, pretrained: str | None, precision: str | None) -> dict[str, Any]:
    from clipforge.retrieval.embed import model_reference, store_info

    if model is not None:
        return model_reference(model, config, pretrained, precision or "fp32")
    if store is None:
        raise ConfigError("--model is needed: there is no store yet to take the model from")
    recorded = store_info(store).get("model")
    if not recorded:
        raise ConfigError(f"{store}: no model recorded; pass --model")
    return recorded | ({"precision": precision} if precision else {})


def _find_store(index: Path) -> Path:
    """The store ``--index`` names (a store, or a photo folder's own), with OpenMP made passive first."""
    _passive_openmp()
    from clipforge.retrieval.photos import find_store

    return find_store(index)


def _refuse_exclude_dir(store: Path, exclude_dir: list[str] | None) -> None:
    """``--exclude-dir`` chooses a photo folder's photos; on an embedding store it could only be ignored."""
    if exclude_dir:
        raise ConfigError(
            f"--exclude-dir {exclude_dir[0]}: {store} is an embedding store, whose rows were chosen when it was embedded; "
            "the option applies to photo folders"
        )


def _require_index(root: Path, kind: str) -> None:
    """Refuse, naming the command that fixes it, a store without ``kind`` embeddings or without their index."""
    from clipforge.retrieval.search import index_dir
    from clipforge.retrieval.store import EmbeddingStore

    if kind not in EmbeddingStore(root).kinds:
        how = "embed the captions too (clipforge embed ... --captions)" if kind == "text" else "embed images into it (clipforge embed)"
        raise ConfigError(f"{root}: holds no {kind} embeddings; {how}, then run clipforge index {root} --kind {kind}")
    if not (index_dir(root, kind) / "index.json").is_file():
        raise ConfigError(f"{root}: no {kind} index yet; build it with clipforge index {root}" + (" --kind text" if kind == "text" else ""))


def _load(store: Path, options: StoreModel) -> tuple[Any, dict[str, Any]]:
    """The model that embeds queries for ``store``, and its reference. Refused, naming both models, when its
    embeddings differ in size from the store's; another model of the same size is noted once."""
    from clipforge.retrieval.embed import STORE_INFO, load_model, store_info
    from clipforge.retrieval.store import EmbeddingStore

    reference = _model_reference(store, options.model, options.config, options.pretrained, options.precision)
    loaded = load_model(reference, device=options.device)
    recorded = (store_info(store).get("model") if (store / STORE_INFO).is_file() else None) or {}
    made_with = recorded.get("source", "a model it does not record")
    size, store_size = loaded.config.embed_dim, EmbeddingStore(store).dim
    if size != store_size:
        raise ConfigError(
            f"--model {reference['source']}: makes {size}-dimensional embeddings, but {store} holds {store_size}-dimensional "
            f"ones made with {made_with}; leave out --model to use the store's model, or embed the collection with this one"
        )
    if recorded and (reference["source"], reference.get("pretrained")) != (recorded["source"], recorded.get("pretrained")):
        warn("note", f"--model {reference['source']} is not the model {store} was made with ({made_with}); "
                     "scores compare the embeddings of two models")
    return loaded, reference


def index_command(
    directory: Annotated[Path, typer.Argument(help="An embedding store, or a folder of photos to index incrementally.")],
    model: StoreModelOption = None,
    store: Annotated[Path | None, typer.Option(help="Photo folders: where their store lives (default DIR/.clipforge).")] = None,
    memory_budget: Annotated[str, typer.Option(help="Most memory the index may use, e.g. 4GB.")] = "4GB",
    target_recall: Annotated[float, typer.Option(min=0.0, max=1.0, help="Recall@10 the approximate index is tuned to reach.")] = 0.95,
    kind: KindOption = "img",
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
    precision: StorePrecisionOption = None,
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = None,
    device: DeviceOption = "auto",
    exclude_dir: ExcludeDirOption = None,
) -> None:
    """Build the search index of a store, or bring a photo folder's store and index up to date."""
    _passive_openmp()
    from clipforge.retrieval.photos import default_store, is_store

    budget = parse_size(memory_budget, "--memory-budget")
    if not directory.is_dir():
        raise InputError(f"{directory}: {'not a folder' if directory.exists() else 'no such folder'}")
    if store is not None or not is_store(directory):
        root = (store or default_store(directory)).absolute()
        checked_output(root, directory=True, option="--store")
        _refresh_photos(
            directory, root, StoreModel(model, config, pretrained, precision, device), kind, budget, target_recall,
            batch_size, workers, report=say, exclude_dirs=exclude_dir,
        )
        return
    _refuse_exclude_dir(directory, exclude_dir)
    given = [name for name, value in (("--model", model), ("--config", config), ("--pretrained", pretrained), ("--precision", precision)) if value]
    if given:
        raise InputError(
            f"{given[0]}: {directory} is an embedding store, indexed from the vectors it holds; model options apply "
            "to photo folders (re-embed with `clipforge embed` to change the model)"
        )
    _build_index(directory, kind, budget, target_recall, say)


@dataclass(frozen=True)
class StoreModel:
    """The model options of ``index``, ``search`` and ``serve`` (default: the model the store records)."""

    model: str | None
    config: str | None
    pretrained: str | None
    precision: str | None
    device: str


def _build_index(root: Path, kind: str, budget: int, target_recall: float, report: Callable[[str], None]) -> None:
    from clipforge.retrieval import SearchIndex, index_dir

    spec = SearchIndex.build(root, kind, memory_budget=budget, target_recall=target_recall).spec
    report(f"{spec.factory} index over {spec.num_vectors:,} vectors in {index_dir(root, kind)}: {spec.reason}")
    report(f"recall@{spec.recall_k} = {spec.recall:.3f} (target {spec.target_recall}); search parameters {spec.params}")


def _refresh_photos(
    folder: Path, root: Path, options: StoreModel, kind: str, budget: int, target_recall: float, batch_size: int,
    workers: int | None, report: Callable[[str], None], exclude_dirs: list[str] | None = None, quiet_when_unchanged: bool = False,
) -> Any:
    """Bring the photo folder's store ``root`` and its index up to date (rclip's incremental indexing); return the
    loaded model. ``report`` gets the summary lines (none when nothing changed and ``quiet_when_unchanged``)."""
    from clipforge.encode import default_workers
    from clipforge.retrieval import index_dir
    from clipforge.retrieval.embed import load_model
    from clipforge.retrieval.photos import is_store, update_photo_store

    reference = _model_reference(root if is_store(root) else None, options.model, options.config, options.pretrained, options.precision)
    loaded = load_model(reference, device=options.device)
    update = update_photo_store(
        folder, loaded, reference, root, batch_size=batch_size, workers=default_workers() if workers is None else workers,
        exclude_dirs=exclude_dirs or (),
    )
    indexed = (index_dir(root, kind) / "index.json").is_file()
    if update.changed or update.skipped_changed or not indexed or not quiet_when_unchanged:
        for _, reason in update.skipped:
            warn("skipped", reason)
        if update.previous_model is not None:
            warn("note", f"{root} was made with another model ({update.previous_model.get('source')}); every photo is embedded again")
        report(
            f"{folder}: {update.new} new, {update.modified} changed, {update.unchanged} unchanged, {update.touched} touched, "
            f"{update.moved} moved or renamed, {update.removed} removed, {len(update.skipped)} unreadable"
        )
    if update.changed or not indexed:
        _build_index(root, kind, budget, target_recall, report)
    elif not quiet_when_unchanged:
        report(f"the index in {root} is up to date")
    return loaded


def search_command(
    query: Annotated[list[str], typer.Argument(help="Terms joined by + and -, each text or ./image.jpg, optionally weighted: 2:dog + ./pool.jpg - night")],
    index: Annotated[Path, typer.Option("--index", "-i", help="A store, or a photo folder or any folder inside one (default: here).")] = Path("."),
    model: StoreModelOption = None,
    k: Annotated[int, typer.Option("--top", "-k", min=1, help="Number of results.")] = 10,
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    paths_only: Annotated[bool, typer.Option("--paths-only", "-f", help="Print only the paths, one per line (for a viewer).")] = False,
    refresh: Annotated[bool, typer.Option(help="Photo folders: index new, moved and deleted photos before searching.")] = True,
    kind: KindOption = "img",
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
    precision: StorePrecisionOption = None,
    device: DeviceOption = "auto",
    memory_budget: Annotated[str, typer.Option(help="Photo folders: most memory a rebuilt index may use.")] = "4GB",
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = None,
    exclude_dir: ExcludeDirOption = None,
) -> None:
    """The k nearest images (or captions) to a query: paths and cosine scores.

    In a photo folder (or any folder inside one) the folder's store is brought up to date first, like rclip,
    and only photos under the folder asked about are returned.
    """
    _passive_openmp()
    from clipforge.retrieval import SearchIndex
    from clipforge.retrieval.photos import default_store, is_store
    from clipforge.retrieval.query import parse_query, query_vector

    terms = parse_query(" ".join(query))
    target, loaded, within = index.absolute(), None, None
    if is_store(target):
        _refuse_exclude_dir(target, exclude_dir)
        root = target
    else:
        folder = next((place for place in (target, *target.parents) if is_store(default_store(place))), target)
        root = default_store(folder)
        if not is_store(root) and model is None:
            raise InputError(
                f"{target}: no embedding store here or in a folder above; give --model to index this folder now, "
                f"or run clipforge index {target} --model M first"
            )
        if refresh or not is_store(root):
            options = StoreModel(model, config, pretrained, precision, device)
            loaded = _refresh_photos(folder, root, options, kind, parse_size(memory_budget, "--memory-budget"), 0.95,
                                     batch_size, workers, report=log_line, exclude_dirs=exclude_dir, quiet_when_unchanged=True)
        within = target.relative_to(folder).as_posix() + "/" if target != folder else None
    _require_index(root, kind)
    searcher = SearchIndex(root, kind)
    vector = query_vector(loaded or _load(root, StoreModel(model, config, pretrained, precision, device))[0], terms)
    if within is None:
        hits = searcher.results(vector, k)
    else:  # a subfolder: only the photos under it
        hits = searcher.results_under(vector, within, k)
    if json_output:
        print(json.dumps(hits))
        return
    if paths_only:
        for hit in hits:
            say(_where(hit))
        return
    from rich.table import Table

    table = Table("#", "score", title=escape(" ".join(query)), show_edge=False)
    table.add_column("path", overflow="fold")  # whole paths, to copy
    table.add_column("caption")
    for rank, hit in enumerate(hits, 1):
        table.add_row(str(rank), f"{hit['score']:.4f}", escape(_where(hit)), escape(hit.get("caption") or ""))
    console.print(table)


def _where(hit: dict[str, Any]) -> str:
    """Where a result's image is: its file, or ``SHARD:KEY`` for a member of a webdataset shard."""
    return f"{hit.get('path', '')}:{hit['sample']}" if hit.get("sample") else hit.get("path", "")


def serve_command(
    index: Annotated[Path, typer.Option("--index", "-i", help="The store (or photo folder) to serve.")],
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    model: StoreModelOption = None,
    kind: KindOption = "img",
    max_k: Annotated[int, typer.Option(min=1, help="Most results one request may ask for.")] = 100,
    max_upload: Annotated[str, typer.Option(help="Largest request body (image upload), e.g. 10MB.")] = "10MB",
    max_upload_pixels: Annotated[int, typer.Option(min=1, help="Most pixels an uploaded image may decode to.")] = 24_000_000,
    config: ConfigOption = None,
    pretrained: PretrainedOption = None,
    precision: StorePrecisionOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Serve the JSON API (OpenAPI at /openapi.json) and the search page at http://HOST:PORT/."""
    max_upload_bytes = parse_size(max_upload, "--max-upload")
    root = _find_store(index)
    from clipforge.serve import serve

    _require_index(root, kind)
    loaded, reference = _load(root, StoreModel(model, config, pretrained, precision, device))
    serve(root, loaded, host=host, port=port, kind=kind, max_k=max_k, max_upload_bytes=max_upload_bytes,
          max_upload_pixels=max_upload_pixels, model_source=reference["source"])
