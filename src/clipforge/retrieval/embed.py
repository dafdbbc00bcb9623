"""Embedding a large collection into clip-retrieval's store layout as idempotent, resumable parts.

The scale-out pattern of img2dataset and clip-retrieval's ``clip_inference`` distributors: a deterministic task list (parts), workers
that skip finished tasks, no collective communication. Each folder or manifest is cut into parts of
``part_size`` images in sorted order; each webdataset shard is one part (clip-retrieval maps input
files to output partitions the same way, §4.3). Part ``p`` is done by rank ``p % world_size``
(``RANK``/``WORLD_SIZE`` under torchrun or ``srun``). A part is written with ``index.store.write_part``
(atomic files), then its completion record ``parts/part_{p}.json`` (row count and skipped images): a
rerun skips every part that has one, so a job killed at any moment resumes where it stopped and no
part is written twice. Batches never cross parts, so a resumed job writes the same bytes as an
uninterrupted one. ``clipforge.json`` records the model and inputs (so search can load the same model
and a rerun with other settings is refused) and the roots the server may read images from.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipforge._util.fileio import atomic_path
from clipforge._util.progress import progress_bar
from clipforge.api import load
from clipforge.data.formats.names import table_from_rows
from clipforge.data.formats.shards import expand_shards
from clipforge.encode import Encoder, encode_image_batches, encode_texts, fixed_batches
from clipforge.errors import ConfigError, InputError
from clipforge.models.clip import CLIP
from clipforge.retrieval.inputs import (
    STORE_NAMES,
    ImageItem,
    file_item,
    folder_items,
    input_kind,
    input_root,
    manifest_items,
    shard_items,
)
from clipforge.retrieval.store import write_part

STORE_INFO = "clipforge.json"
STORE_FORMAT = 1
DEFAULT_PART_SIZE = 10_000


@dataclass(frozen=True)
class Part:
    """One unit of work: part ``number`` of the store, and how to list its images."""

    number: int
    load: Callable[[], list[ImageItem]]


@dataclass
class _PartBuffer:
    """What a part has gathered so far: its readable images, their embeddings, the unreadable ones."""

    items: list[ImageItem] = field(default_factory=list)
    image_rows: list[torch.Tensor] = field(default_factory=list)
    text_rows: list[torch.Tensor] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class JobReport:
    num_parts: int
    written: list[int] = field(default_factory=list)  # parts this run wrote
    already_done: list[int] = field(default_factory=list)  # parts of this rank finished by an earlier run
    rows: int = 0  # embeddings this run wrote
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, one-line reason)
    unreadable_folders: list[tuple[str, str]] = field(default_factory=list)  # (folder, one-line reason)


# --- the model and inputs a store was made from --------------------------------------------------------


def model_reference(source: str, config: str | None, pretrained: str | None, precision: str) -> dict[str, Any]:
    """How to load the model again: file sources by absolute path, names as given."""
    path = Path(source)
    return {
        "source": str(path.absolute()) if path.exists() else source,
        "config": config,
        "pretrained": pretrained,
        "precision": precision,
    }


def load_model(reference: dict[str, Any], device: str | torch.device = "cpu") -> CLIP:
    """The model a ``model_reference`` describes; refuses random weights, which a store could never match."""
    if not Path(reference["source"]).exists() and not reference.get("pretrained"):
        raise ConfigError(
            f"--model {reference['source']}: no such file, and a config name without --pretrained has random "
            "weights that differ on every load; add --pretrained TAG (clipforge models --pretrained lists them) or pass "
            "a checkpoint file (clipforge convert SOURCE model.safetensors writes one from any format)"
        )
    return load(
        reference["source"], config=reference.get("config"), precision=reference.get("precision", "fp32"),
        pretrained=reference.get("pretrained"), device=device,
    )


def store_info(root: str | Path) -> dict[str, Any]:
    """The ``clipforge.json`` of a store (``InputError`` when it has none)."""
    path = Path(root) / STORE_INFO
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing; the store was not written by clipforge embed or index") from None
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable store description ({error})") from None


def write_store_info(root: str | Path, info: dict[str, Any]) -> None:
    with atomic_path(Path(root) / STORE_INFO) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True))


def _claim_store(root: Path, info: dict[str, Any]) -> None:
    """Write the job description, or check that the store already holds this very job."""
    if (root / STORE_INFO).exists():
        existing = store_info(root)
        if existing != json.loads(json.dumps(info)):
            changed = sorted(key for key in info | existing if existing.get(key) != info.get(key))
            raise ConfigError(f"{root}: holds embeddings of another job ({', '.join(changed)} differ); use an empty directory")
        return
    write_store_info(root, info)


# --- the task list -------------------------------------------------------------------------------------


def _chunked(items: list[ImageItem], part_size: int, first: int) -> list[Part]:
    return [
        Part(first + i, lambda start=start: items[start : start + part_size])
        for i, start in enumerate(range(0, len(items), part_size))
    ]


def plan_parts(
    inputs: Sequence[str | Path],
    part_size: int = DEFAULT_PART_SIZE,
    captions: bool = False,
    image_column: str | None = None,
    caption_column: str | None = None,
    unreadable: list[tuple[str, str]] | None = None,
) -> list[Part]:
    """The job's parts, numbered in input order (image files given one by one come last, together).

    Inputs may be brace patterns of shards (``"shards/{00000..00099}.tar"``); a folder holding no images
    but ``.tar`` shards stands for its shards, in name order. A manifest's captions are kept in the
    metadata and embedded under ``captions``; folders and shards read captions only then. Sub-folders that
    cannot be read go to ``unreadable`` (an error without it).
    """
    if part_size < 1:
        raise ConfigError(f"part_size must be at least 1, got {part_size}")
    parts: list[Part] = []
    single_images: list[ImageItem] = []
    for path in [Path(expanded) for given in inputs for expanded in expand_shards(str(given))]:
        kind = input_kind(path)
        if kind == "shard":
            parts.append(_shard_part(len(parts), path, captions))
        elif kind == "image":
            single_images.append(file_item(path, captions))
        else:
            items = folder_items(path, captions, unreadable) if kind == "folder" else manifest_items(path, image_column, caption_column)
            shards = sorted(path.glob("*.tar")) if kind == "folder" and not items else []
            if not items and not shards:
                raise InputError(f"{path}: no images found" + (" (nor .tar shards)" if kind == "folder" else ""))
            parts.extend(_chunked(items, part_size, len(parts)))
            parts.extend([_shard_part(len(parts) + i, shard, captions) for i, shard in enumerate(shards)])
    return parts + _chunked(single_images, part_size, len(parts))


def _shard_part(number: int, shard: Path, captions: bool) -> Part:
    return Part(number, lambda: shard_items(shard, captions))


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's ``RANK``/``WORLD_SIZE`` (0, 1 when not set)."""
    try:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise ConfigError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} are not integers") from None
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    return rank, world_size


def record_path(root: str | Path, part: int) -> Path:
    return Path(root) / "parts" / f"part_{part}.json"


_TEMPORARY = re.compile(r"^\.(?:img_emb|text_emb|metadata|part)_(\d+)\.(?:npy|parquet|json)\..+\.tmp$")
_PART_FOLDERS = ("img_emb", "text_emb", "metadata", "parts")


def _remove_temporaries(root: Path, parts: set[int]) -> None:
    """Delete what a killed run left half-written (``atomic_path`` temporaries) of the given parts only,
    so ranks running at the same time never touch each other's files."""
    for folder in _PART_FOLDERS:
        for path in (root / folder).glob(".*.tmp"):
            match = _TEMPORARY.match(path.name)
            if match and int(match.group(1)) in parts:
                path.unlink(missing_ok=True)


# --- running the job -----------------------------------------------------------------------------------


def _write(root: Path, part: int, buffer: _PartBuffer) -> None:
    """The part's embeddings and metadata (if any image was readable), then its completion record."""
    if buffer.items:
        metadata = table_from_rows([item.metadata() for item in buffer.items], names=STORE_NAMES)
        write_part(root, "img", part, torch.cat(buffer.image_rows).numpy(), metadata)
        if buffer.text_rows:
            write_part(root, "text", part, torch.cat(buffer.text_rows).numpy(), None)
    skipped = [{"image": image, "reason": reason} for image, reason in buffer.skipped]
    with atomic_path(record_path(root, part)) as tmp:
        tmp.write_text(json.dumps({"part": part, "rows": len(buffer.items), "skipped": skipped}, indent=2))


def _batches(pending: list[tuple[int, list[ImageItem]]], batch_size: int) -> tuple[list[ImageItem], list[range], list[int]]:
    """All pending images in one list, batches of positions in it that never cross a part, each batch's part."""
    sources, batches, owners = [], [], []
    for part, items in pending:
        start = len(sources)
        sources.extend(items)
        for batch in fixed_batches(len(items), batch_size):
            batches.append(range(start + batch.start, start + batch.stop))
            owners.append(part)
    return sources, batches, owners


def embed_to_store(
    model: Encoder,
    reference: dict[str, Any],
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    part_size: int = DEFAULT_PART_SIZE,
    batch_size: int = 64,
    workers: int = 0,
    strict: bool = False,
    captions: bool = False,
    image_column: str | None = None,
    caption_column: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> JobReport:
    """Embed this rank's unfinished parts of ``inputs`` into the store ``out`` (see the module docstring).

    With ``captions`` every image needs a caption, and the captions are embedded too (``text_emb``).
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
    root = Path(out)
    unreadable: list[tuple[str, str]] = []
    parts = plan_parts(inputs, part_size, captions, image_column, caption_column, unreadable)
    info = {
        "format": STORE_FORMAT,
        "model": reference,
        "dim": model.config.embed_dim,
        "inputs": [str(Path(given).absolute()) for given in inputs],
        "roots": sorted({str(input_root(Path(given))) for given in inputs}),
        "captions": captions,
        "part_size": part_size,
        "num_parts": len(parts),
    }
    _claim_store(root, info)
    report = JobReport(len(parts), unreadable_folders=unreadable)
    mine = parts[rank::world_size]
    _remove_temporaries(root, {part.number for part in mine})
    pending: list[tuple[int, list[ImageItem]]] = []
    for part in mine:
        if record_path(root, part.number).exists():
            report.already_done.append(part.number)
        elif items := part.load():
            pending.append((part.number, items))
        else:
            _write(root, part.number, _PartBuffer())
            report.written.append(part.number)
    sources, batches, owners = _batches(pending, batch_size)
    last_batch = {part: position for position, part in enumerate(owners)}
    buffer = _PartBuffer()
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("embedding images", total=len(sources), unit="img")
        images = [item.image_source() for item in sources]
        results = encode_image_batches(model, images, batches, workers if len(batches) > 1 else 0, strict)
        for position, (positions, vectors, bad) in enumerate(results):
            items = [sources[i] for i in positions]
            buffer.items.extend(items)
            buffer.image_rows.append(vectors)
            if captions and items:
                buffer.text_rows.append(encode_texts(model, [item.caption for item in items]))
            buffer.skipped.extend((sources[i].label, reason) for i, reason in bad)
            bar.advance(task, len(positions) + len(bad))
            part = owners[position]
            if last_batch[part] == position:
                _write(root, part, buffer)
                report.written.append(part)
                report.rows += len(buffer.items)
                report.skipped.extend(buffer.skipped)
                buffer = _PartBuffer()
    return report
