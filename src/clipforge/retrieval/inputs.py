"""What to embed and where embeddings go: image folders, manifests and webdataset shards in; parquet out.

Inputs become ``ImageItem`` records (an id, where the image bytes are, an optional caption), read by
``clipforge.data.formats`` exactly as training and evaluation read them:

- a folder: its image files, recursively, sorted; with captions, the ``.txt`` file with the same path
  minus the extension (``formats.folders``);
- a manifest (``.csv``, ``.tsv``, ``.parquet``, ``.jsonl``, ``formats.tables``): one row per image,
  paths relative to the manifest's folder, and a caption column;
- a webdataset shard (``.tar``): one item per sample with an image, located by the shard's cached
  index (``formats.shards``) so decoding workers read it with one seek;
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
from clipforge._util.imageio import is_image_path
from clipforge.data.formats.folders import Problems, image_files, sidecar_caption
from clipforge.data.formats.names import restore_names, table_from_rows
from clipforge.data.formats.shards import ShardMember, shard_index
from clipforge.data.formats.tables import TABLE_SUFFIXES, read_caption_table
from clipforge.errors import InputError, one_line

STORE_NAMES = ("uid", "path", "sample")
"""Metadata columns holding file names (kept exactly, see ``clipforge.data.formats.names``)."""


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
        row = restore_names(row, STORE_NAMES)
        in_shard = row.get("offset") is not None
        return cls(
            str(row["uid"]), str(row["path"]), row.get("caption"), row.get("sample"),
            int(row["offset"]) if in_shard else -1, int(row["size"]) if in_shard else -1,
        )

    def image_source(self) -> str | ShardMember:
        """Where the encoded image is, for ``clipforge.data.formats.images.read_image``."""
        return self.path if self.offset < 0 else ShardMember(self.path, self.sample or "", self.offset, self.size)

    def read_bytes(self) -> bytes:
        """The encoded image: the whole file, or its byte range inside the shard."""
        source = self.image_source()
        if isinstance(source, ShardMember):
            return source.read()
        try:
            return Path(source).read_bytes()
        except OSError as error:
            raise InputError(f"{self.label}: cannot read ({one_line(error)})") from None


def collect_image_paths(inputs: Sequence[str | Path], unreadable: Problems | None = None) -> list[Path]:
    """Files as given and image files under folders (sorted); a missing input is an error naming it.
    Sub-folders that cannot be read go to ``unreadable`` (see ``data.formats.folders.image_files``)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(image_files(path, unreadable))
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
    if suffix in TABLE_SUFFIXES:
        return "manifest"
    if suffix == ".tar":
        return "shard"
    if is_image_path(path):
        return "image"
    raise InputError(f"{path}: not a folder, image, .tar shard or manifest ({', '.join(TABLE_SUFFIXES)})")


def input_root(path: Path) -> Path:
    """The folder whose files an input may name: the folder itself, or the folder holding the file."""
    absolute = path.absolute()
    return absolute if absolute.is_dir() else absolute.parent


def file_item(image: Path, captions: bool = False) -> ImageItem:
    """An image file, identified by its absolute path; with ``captions``, captioned by its ``.txt``."""
    path = str(image.absolute())
    return ImageItem(path, path, sidecar_caption(image, str(image)) if captions else None)


def folder_items(folder: Path, captions: bool = False, unreadable: Problems | None = None) -> list[ImageItem]:
    """The folder's images, sorted (unreadable sub-folders as in ``collect_image_paths``)."""
    return [file_item(image, captions) for image in image_files(folder, unreadable)]


def manifest_items(path: Path, image_column: str | None = None, caption_column: str | None = None) -> list[ImageItem]:
    """One item per manifest row, with its caption; relative paths are relative to the manifest's folder."""
    table = read_caption_table(path, image_column, caption_column)
    if not table.holds_paths:
        raise InputError(f"{path}: column {table.image_column!r} holds image bytes; a store needs image files")
    base = path.absolute().parent
    items = []
    for number in range(len(table)):
        image = table.image_path(number)
        if image is None:
            raise InputError(f"{path}: row {number} has an empty {table.image_column!r}")
        location = str(base / image)
        items.append(ImageItem(location, location, table.caption(number, f"{path} row {number}")))
    return items


def shard_items(path: Path, captions: bool = False) -> list[ImageItem]:
    """One item per sample of the shard that has an image, with its ``.txt`` caption under ``captions``."""
    index = shard_index(path)
    shard = str(path.absolute())
    items = []
    for row, key in enumerate(index.keys):
        image = index.image(row)
        if image is None:
            continue
        caption = index.caption(row) if captions else None
        items.append(ImageItem(key, shard, caption, key, image.offset, image.size))
    return items


def write_embeddings(path: str | Path, sources: Sequence[str], vectors: np.ndarray, *, model: str, kind: str) -> None:
    """A parquet table ``source | embedding`` (fixed-size float32 lists), written atomically."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    table = table_from_rows([{"source": source} for source in sources], names=("source",)).append_column("embedding", column)
    table = table.replace_schema_metadata({"clipforge": json.dumps({"model": model, "kind": kind, "dim": vectors.shape[1]})})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Sources (file names exactly as on disk, see ``clipforge.data.formats.names``) and an [N, D] float32 array
    from a file written by ``write_embeddings``."""
    table = pq.read_table(path)
    dim = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    rows = table.drop_columns(["embedding"]).to_pylist()
    return [restore_names(row, ("source",))["source"] for row in rows], vectors
