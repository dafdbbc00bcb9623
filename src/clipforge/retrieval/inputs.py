"""What to embed and where embeddings go: image folders, manifests and webdataset shards in; parquet out.

Inputs become ``ImageItem`` records (an id, where the image bytes are, an optional caption):

- a folder: its image files, recursively, sorted; with captions, the ``.txt`` file with the same path
  minus the extension (the pairing ``data.sources.FolderSource`` uses too, research/data-retrieval.md §4.3);
- a manifest (``.csv``, ``.tsv``, ``.parquet``, ``.jsonl``, read by ``data.manifest.read_manifest``):
  one row per image, paths relative to the manifest's folder, and a caption column;
- a webdataset shard (``.tar``): one item per sample with an image, located by the shard's cached
  offset index (``data.manifest.shard_offsets``) so decoding workers read it with one seek;
- an image file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge._util.fileio import atomic_path
from clipforge._util.imageio import is_image_path, open_image
from clipforge.data.manifest import (
    MANIFEST_SUFFIXES,
    NO_MEMBER,
    read_manifest,
    read_member,
    shard_offsets,
)
from clipforge.data.sources import decode_caption
from clipforge.errors import InputError, one_line


@dataclass(frozen=True)
class ImageItem:
    """One image to embed: its id, the file holding it and, inside a shard, its sample key and byte range."""

    uid: str
    path: str  # the image file, or the shard .tar holding the image
    caption: str | None = None
    sample: str | None = None  # the sample's key inside the shard
    offset: int = -1  # first byte of the image inside the shard (-1: ``path`` is the image)
    size: int = -1

    @property
    def label(self) -> str:
        """How error messages and listings name the image (``shard:key`` inside a shard)."""
        return f"{self.path}:{self.sample}" if self.sample else self.path

    def metadata(self) -> dict[str, Any]:
        """The item's metadata row in an embedding store."""
        row: dict[str, Any] = {"uid": self.uid, "path": self.path}
        if self.caption is not None:
            row["caption"] = self.caption
        if self.sample is not None:
            row.update(sample=self.sample, offset=self.offset, size=self.size)
        return row

    @classmethod
    def from_metadata(cls, row: dict[str, Any]) -> ImageItem:
        """The item a metadata row describes (rows of photo stores hold a file ``size`` but no ``offset``)."""
        in_shard = row.get("offset") is not None
        return cls(
            str(row["uid"]), str(row["path"]), row.get("caption"), row.get("sample"),
            int(row["offset"]) if in_shard else -1, int(row["size"]) if in_shard else -1,
        )

    def read_bytes(self) -> bytes:
        """The encoded image: the whole file, or its byte range inside the shard."""
        try:
            if self.offset < 0:
                return Path(self.path).read_bytes()
            data = read_member(Path(self.path), self.offset, self.size)
        except OSError as error:
            raise InputError(f"{self.label}: cannot read ({one_line(error)})") from None
        if data is None:
            raise InputError(f"{self.label}: the shard is shorter than its index says (changed since?)")
        return data


def read_image(source: Any) -> Any:
    """A decoded PIL image from a PIL image, an image path or an ``ImageItem`` (``InputError`` names it)."""
    if hasattr(source, "convert"):
        return source
    if isinstance(source, ImageItem):
        return open_image(source.path) if source.offset < 0 else open_image(source.read_bytes(), name=source.label)
    return open_image(source)


def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_path(p))


def collect_image_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given and image files under folders (sorted); a missing input is an error naming it."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(_folder_images(path))
        elif path.is_file():
            paths.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    if not paths:
        raise InputError(f"no images found in {', '.join(map(str, inputs))}")
    return paths


def input_kind(path: Path) -> str:
    """``folder``, ``manifest``, ``shard`` or ``image``; ``InputError`` for anything else."""
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise InputError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix in MANIFEST_SUFFIXES:
        return "manifest"
    if suffix == ".tar":
        return "shard"
    if is_image_path(path):
        return "image"
    raise InputError(f"{path}: not a folder, image, .tar shard or manifest ({', '.join(MANIFEST_SUFFIXES)})")


def input_root(path: Path) -> Path:
    """The folder whose files an input may name: the folder itself, or the folder holding the file."""
    absolute = path.absolute()
    return absolute if absolute.is_dir() else absolute.parent


def file_item(image: Path, captions: bool = False) -> ImageItem:
    """An image file, identified by its absolute path; with ``captions``, captioned by its ``.txt``."""
    path = str(image.absolute())
    if not captions:
        return ImageItem(path, path)
    try:
        raw = image.with_suffix(".txt").read_bytes()
    except FileNotFoundError:
        raw = None
    except OSError as error:
        raise InputError(f"{image.with_suffix('.txt')}: unreadable caption ({one_line(error)})") from None
    return ImageItem(path, path, decode_caption(raw, str(image)))


def folder_items(folder: Path, captions: bool = False) -> list[ImageItem]:
    """The folder's images, sorted."""
    return [file_item(image, captions) for image in _folder_images(folder)]


def manifest_items(path: Path, image_column: str | None = None, caption_column: str | None = None) -> list[ImageItem]:
    """One item per manifest row, with its caption; relative paths are relative to the manifest's folder."""
    columns = read_manifest(path, image_column, caption_column)
    if not pa.types.is_string(columns.images.type):
        raise InputError(f"{path}: column {columns.image_column!r} holds image bytes; a store needs image files")
    base = path.absolute().parent
    items = []
    for number, (image, caption) in enumerate(zip(columns.images.to_pylist(), columns.captions.to_pylist())):
        if not image or not image.strip():
            raise InputError(f"{path}: row {number} has an empty {columns.image_column!r}")
        location = str(base / image)
        items.append(ImageItem(location, location, decode_caption(caption, f"{path} row {number}")))
    return items


def shard_items(path: Path, captions: bool = False) -> list[ImageItem]:
    """One item per sample of the shard that has an image, with its ``.txt`` caption under ``captions``."""
    offsets = shard_offsets(path)
    shard = str(path.absolute())
    items = []
    for row, key in enumerate(offsets.keys):
        if offsets.image_offsets[row] == NO_MEMBER:
            continue
        caption = None
        if captions:
            has_caption = offsets.caption_offsets[row] != NO_MEMBER
            raw = read_member(path, int(offsets.caption_offsets[row]), int(offsets.caption_sizes[row])) if has_caption else None
            caption = decode_caption(raw, f"{path}:{key}")
        items.append(ImageItem(key, shard, caption, key, int(offsets.image_offsets[row]), int(offsets.image_sizes[row])))
    return items


def write_embeddings(path: str | Path, sources: Sequence[str], vectors: np.ndarray, *, model: str, kind: str) -> None:
    """A parquet table ``source | embedding`` (fixed-size float32 lists), written atomically."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    table = pa.table({"source": pa.array(list(sources), pa.string()), "embedding": column})
    table = table.replace_schema_metadata({"clipforge": json.dumps({"model": model, "kind": kind, "dim": vectors.shape[1]})})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Sources and an [N, D] float32 array from a file written by ``write_embeddings``."""
    table = pq.read_table(path)
    dim = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return table.column("source").to_pylist(), vectors
