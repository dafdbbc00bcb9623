"""Image-caption data sources, all map-style with random access (issue #3, "Data sources").

Random access to every sample is what makes exact resume and clean sharding possible (see
``clipforge.data.loader``): a folder of images with sidecar captions, a CSV/TSV/parquet/JSONL
manifest (open_clip's ``--dataset-type csv``), webdataset shards in img2dataset's layout made
randomly accessible by a tar offset index (``clipforge.data.manifest``), and the synthetic world.

    source = open_source("shards/{00000..00009}.tar")   # or a folder, a manifest, "synthetic"
    image, caption = source.load(0)                     # InputError naming source.key(0) if bad

A bad sample raises ``SampleError`` (an ``InputError``) whose message is one line,
``"<key>: <reason> (<detail>)"``; ``reason`` is one of a few fixed phrases so skips can be counted.
"""

from __future__ import annotations

import bisect
import dataclasses
import inspect
import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import braceexpand
import pyarrow as pa
from PIL import Image

from clipforge._util.imageio import IMAGE_EXTENSIONS, is_image_path, open_image
from clipforge.data.manifest import (
    MANIFEST_SUFFIXES,
    NO_MEMBER,
    read_manifest,
    read_member,
    shard_offsets,
)
from clipforge.data.synthetic import SPLITS, SyntheticWorld, WorldConfig
from clipforge.errors import ConfigError, InputError, one_line

UNREADABLE_IMAGE = "unreadable image"
MISSING_IMAGE = "missing image"
MISSING_CAPTION = "missing caption"
CAPTION_NOT_UTF8 = "caption is not UTF-8"
EMPTY_CAPTION = "empty caption"
EMPTY_SHARD = "empty shard"
UNREADABLE_CAPTION = "unreadable caption file"
TRUNCATED_SHARD = "truncated shard"

DEFAULT_SYNTHETIC_LENGTH = 100_000
INDEX_THREADS = 8  # shard offset indexes read or built at once
SOURCE_LIST_SEPARATOR = "::"  # open_clip's separator for several data sources


class SampleError(InputError):
    """One bad sample: ``key`` names it, ``reason`` is a fixed phrase to count by, ``detail`` says more."""

    def __init__(self, key: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{key}: {reason}" + (f" ({detail})" if detail else ""))
        self.key, self.reason, self.detail = key, reason, detail


class CaptionSource(Protocol):
    """A fixed-length, randomly accessible collection of image-caption samples.

    ``dropped`` lists (name, reason) of inputs left out while indexing (e.g. an empty shard), for the
    loader to report once.
    """

    dropped: list[tuple[str, str]]

    def __len__(self) -> int: ...

    def key(self, index: int) -> str: ...

    def load(self, index: int) -> tuple[Image.Image, str]: ...


def decode_caption(raw: bytes | str | None, key: str, missing: str = "") -> str:
    """The caption text, stripped; ``SampleError`` when it is missing (``missing`` says where it was looked
    for), not UTF-8 or blank."""
    if raw is None:
        raise SampleError(key, MISSING_CAPTION, missing)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise SampleError(key, CAPTION_NOT_UTF8, f"invalid byte at position {error.start}") from error
    text = raw.strip()
    if not text:
        raise SampleError(key, EMPTY_CAPTION)
    return text


def _decode_image(data: bytes | Path, key: str) -> Image.Image:
    try:
        return open_image(data, name=key)
    except InputError as error:
        raise SampleError(key, UNREADABLE_IMAGE, str(error).removeprefix(f"{key}: ")) from error


def _check_index(index: int, length: int) -> int:
    if not 0 <= index < length:
        raise IndexError(f"sample index {index} is outside [0, {length})")
    return int(index)


class FolderSource:
    """Images found recursively under ``root`` (sorted by relative path), each captioned by the
    ``.txt`` file with the same path minus the extension (``a/b.jpg`` → ``a/b.txt``).

    Keys are image paths relative to ``root``. Pairing by path-without-extension avoids clip-retrieval's
    ``files`` reader bug (keys with extensions never pair; research/data-retrieval.md §4.3).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: no such folder")
        found = (path for path in self.root.rglob("*") if is_image_path(path) and path.is_file())
        self.relative_paths = sorted(path.relative_to(self.root).as_posix() for path in found)
        if not self.relative_paths:
            raise InputError(f"{self.root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.dropped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.relative_paths)

    def key(self, index: int) -> str:
        return self.relative_paths[_check_index(index, len(self))]

    def load(self, index: int) -> tuple[Image.Image, str]:
        key = self.key(index)
        path = self.root / key
        caption_path = path.with_suffix(".txt")
        try:
            raw = caption_path.read_bytes()
        except FileNotFoundError:
            raw = None
        except OSError as error:
            raise SampleError(key, UNREADABLE_CAPTION, one_line(error)) from error
        caption = decode_caption(raw, key, f"no {caption_path.name}")
        return _decode_image(path, key), caption


class ManifestSource:
    """Rows of a CSV, TSV, parquet or JSONL manifest: an image column (paths, or encoded bytes in a
    binary column) and a caption column, auto-detected from ``manifest.IMAGE_COLUMNS`` and
    ``manifest.CAPTION_COLUMNS`` unless named. Relative paths resolve against ``root`` (default: the
    manifest's folder). Keys are the paths as written (``"<manifest> row <i>"`` for bytes or a blank path).
    """

    def __init__(
        self,
        path: str | Path,
        image_column: str | None = None,
        caption_column: str | None = None,
        root: str | Path | None = None,
    ) -> None:
        self.path = Path(path)
        columns = read_manifest(self.path, image_column, caption_column)
        self.images, self.captions = columns.images, columns.captions
        self.image_column, self.caption_column = columns.image_column, columns.caption_column
        self.root = Path(root) if root is not None else self.path.parent
        self._holds_bytes = not pa.types.is_string(self.images.type)
        if len(self) == 0:
            raise InputError(f"{self.path}: the manifest has no rows")
        self.dropped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.images)

    def key(self, index: int) -> str:
        index = _check_index(index, len(self))
        value = None if self._holds_bytes else self.images[index].as_py()
        return value if value and value.strip() else f"{self.path.name} row {index}"

    def load(self, index: int) -> tuple[Image.Image, str]:
        key = self.key(index)
        caption = decode_caption(self.captions[index].as_py(), key, f"no {self.caption_column!r} value")
        value = self.images[index].as_py()
        if value is None or (not self._holds_bytes and not value.strip()):
            raise SampleError(key, MISSING_IMAGE, f"no {self.image_column!r} value")
        return _decode_image(value if self._holds_bytes else self.root / value, key), caption


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Shard paths from brace patterns (``"data/{00000..00009}.tar"``), ``::``-joined lists or a list."""
    patterns = shards.split(SOURCE_LIST_SEPARATOR) if isinstance(shards, str) else list(shards)
    return [path for pattern in patterns for path in braceexpand.braceexpand(pattern)]


class WebDatasetSource:
    """Samples of webdataset tar shards in img2dataset's layout: ``{key}.jpg|jpeg|png|webp`` and
    ``{key}.txt`` (other members, such as ``{key}.json``, are ignored), read by tar offset index.

    Keys are ``"<shard>:<sample key>"``. A missing shard is an ``InputError``; an empty one gives no
    samples and is listed in ``dropped`` as an "empty shard".
    """

    def __init__(self, shards: str | Sequence[str]) -> None:
        self.shards = [Path(path) for path in expand_shards(shards)]
        if not self.shards:
            raise ConfigError("webdataset source: no shard paths given")
        with ThreadPoolExecutor(max_workers=INDEX_THREADS) as pool:  # shards may sit on a network file system
            self.offsets = list(pool.map(shard_offsets, self.shards))
        self.dropped = [(str(shard), EMPTY_SHARD) for shard, index in zip(self.shards, self.offsets) if not len(index)]
        self._starts = list(itertools.accumulate((len(index) for index in self.offsets), initial=0))
        if len(self) == 0:
            raise InputError(f"{self.shards[0]}: every one of the {len(self.shards)} shards is empty")

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        index = _check_index(index, len(self))
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def key(self, index: int) -> str:
        shard, row = self._locate(index)
        return f"{self.shards[shard]}:{self.offsets[shard].keys[row]}"

    def load(self, index: int) -> tuple[Image.Image, str]:
        shard, row = self._locate(index)
        key, path, offsets = self.key(index), self.shards[shard], self.offsets[shard]
        raw_caption = self._member(path, key, offsets.caption_offsets[row], offsets.caption_sizes[row])
        caption = decode_caption(raw_caption, key, "no .txt member")
        image = self._member(path, key, offsets.image_offsets[row], offsets.image_sizes[row])
        if image is None:
            raise SampleError(key, MISSING_IMAGE, "no .jpg, .jpeg, .png or .webp member")
        return _decode_image(image, key), caption

    @staticmethod
    def _member(path: Path, key: str, offset: int, size: int) -> bytes | None:
        if offset == NO_MEMBER:
            return None
        data = read_member(path, int(offset), int(size))
        if data is None:
            raise SampleError(key, TRUNCATED_SHARD, f"the file ends before byte {offset + size}")
        return data


class SyntheticSource:
    """The first ``length`` samples of a split of the synthetic world (sample i = ``world.sample(split, i)``)."""

    def __init__(self, world: SyntheticWorld, split: str = "train", length: int = DEFAULT_SYNTHETIC_LENGTH) -> None:
        if split not in SPLITS:
            raise ConfigError(f"synthetic source: split {split!r} is not one of {', '.join(SPLITS)}")
        if not isinstance(length, int) or length < 1:
            raise ConfigError(f"synthetic source: length must be a positive integer, got {length!r}")
        self.world, self.split, self.length = world, split, length
        self.dropped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return self.length

    def key(self, index: int) -> str:
        return f"synthetic/{self.split}/{_check_index(index, self.length)}"

    def load(self, index: int) -> tuple[Image.Image, str]:
        key = self.key(index)
        sample = self.world.sample(self.split, index)
        return sample.image, decode_caption(sample.caption, key)


class ConcatSource:
    """Several sources one after the other (open_clip's ``"a::b"`` lists of data sources)."""

    def __init__(self, parts: Sequence[CaptionSource]) -> None:
        self.parts = list(parts)
        self._starts = list(itertools.accumulate((len(part) for part in self.parts), initial=0))
        self.dropped = [item for part in self.parts for item in part.dropped]

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[CaptionSource, int]:
        index = _check_index(index, len(self))
        part = bisect.bisect_right(self._starts, index) - 1
        return self.parts[part], index - self._starts[part]

    def key(self, index: int) -> str:
        part, row = self._locate(index)
        return part.key(row)

    def load(self, index: int) -> tuple[Image.Image, str]:
        part, row = self._locate(index)
        return part.load(row)


def _synthetic(split: str = "train", length: int = DEFAULT_SYNTHETIC_LENGTH, **world: Any) -> SyntheticSource:
    known = {field.name for field in dataclasses.fields(WorldConfig)}
    if unknown := sorted(set(world) - known):
        raise ConfigError(f"synthetic source: unknown setting {unknown[0]!r} (known: split, length, {', '.join(sorted(known))})")
    return SyntheticSource(SyntheticWorld(WorldConfig(**world)), split, length)


SOURCE_TYPES: dict[str, Callable[..., CaptionSource]] = {
    "folder": FolderSource,
    "manifest": ManifestSource,
    "webdataset": WebDatasetSource,
    "synthetic": _synthetic,
}


def open_source(spec: str | Path | dict[str, Any]) -> CaptionSource:
    """A source from a path, pattern or settings.

    Strings: ``"synthetic"``; ``.tar`` shard paths or patterns (``"data/{00000..00009}.tar"``); a folder
    (of ``.tar`` shards, else of images with ``.txt`` captions); a manifest file (.csv, .tsv, .parquet,
    .jsonl); or several of these joined by ``"::"``. Dicts: ``{"type": <one of SOURCE_TYPES>, ...}``
    with that source's arguments; ``{"type": "synthetic", "split", "length", <WorldConfig fields>}``.
    """
    if isinstance(spec, dict):
        return _open_settings(spec)
    text = str(spec)
    parts = text.split(SOURCE_LIST_SEPARATOR)
    if all(part.endswith(".tar") for part in parts):
        return WebDatasetSource(parts)
    if len(parts) > 1:
        return ConcatSource([open_source(part) for part in parts])
    return _open_one(text)


def _open_settings(spec: dict[str, Any]) -> CaptionSource:
    settings = dict(spec)
    kind = settings.pop("type", None)
    if kind not in SOURCE_TYPES:
        raise ConfigError(f"data source type {kind!r} is not one of {', '.join(SOURCE_TYPES)}")
    factory = SOURCE_TYPES[kind]
    try:
        inspect.signature(factory).bind(**settings)
    except TypeError as error:
        raise ConfigError(f"data source {kind!r}: {one_line(error)}") from error
    return factory(**settings)


def _open_one(text: str) -> CaptionSource:
    if text == "synthetic":
        return _synthetic()
    path = Path(text)
    if path.is_dir():
        shards = sorted(str(shard) for shard in path.glob("*.tar"))
        return WebDatasetSource(shards) if shards else FolderSource(path)
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return ManifestSource(path)
    if not path.exists():
        raise InputError(f"{text}: no such file or folder")
    raise ConfigError(
        f"{text}: not a data source (expected a folder, .tar shards, a {', '.join(MANIFEST_SUFFIXES)} manifest "
        "or 'synthetic')"
    )
