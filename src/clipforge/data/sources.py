"""Image-caption data sources, all map-style with random access (issue #3, "Data sources").

Random access to every sample is what makes exact resume and clean sharding possible (see
``clipforge.data.loader``): a folder of images with sidecar captions, a CSV/TSV/parquet/JSONL
manifest (open_clip's ``--dataset-type csv``), webdataset shards in img2dataset's layout made
randomly accessible by a tar offset index, and the synthetic world. The files are read by
``clipforge.data.formats``, as evaluation and embedding read them.

    source = open_source("shards/{00000..00009}.tar")   # or a folder, a manifest, "synthetic"
    image, caption = source.load(0)                     # InputError naming source.key(0) if bad

A bad sample raises ``SampleError`` (``clipforge.data.formats.samples``, an ``InputError``) whose
message is one line, ``"<key>: <reason> (<detail>)"``; ``reason`` is one of a few fixed phrases so
skips can be counted.
"""

from __future__ import annotations

import bisect
import dataclasses
import inspect
import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from clipforge._util.imageio import IMAGE_EXTENSIONS
from clipforge.data.formats.folders import image_files, sidecar_caption
from clipforge.data.formats.images import read_image
from clipforge.data.formats.samples import (
    EMPTY_SHARD,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    SampleError,
    decode_caption,
)
from clipforge.data.formats.shards import (
    CAPTION_FIELD,
    IMAGE_FIELDS,
    SOURCE_LIST_SEPARATOR,
    expand_shards,
    shard_indexes,
)
from clipforge.data.formats.tables import TABLE_SUFFIXES, read_caption_table
from clipforge.data.synthetic import SPLITS, SyntheticWorld, WorldConfig
from clipforge.errors import ConfigError, InputError, one_line
from clipforge.preprocess.transforms import EvalTransform

DEFAULT_SYNTHETIC_LENGTH = 100_000


class CaptionSource(Protocol):
    """A fixed-length, randomly accessible collection of image-caption samples.

    ``dropped`` lists (name, reason) of inputs left out while indexing (e.g. an empty shard), for the
    loader to report once.
    """

    dropped: list[tuple[str, str]]

    def __len__(self) -> int: ...

    def key(self, index: int) -> str: ...

    def load(self, index: int) -> tuple[Image.Image, str]: ...


def _decode_image(data: bytes | Path, key: str) -> Image.Image:
    try:
        return read_image(data, name=key)
    except InputError as error:
        raise SampleError(key, UNREADABLE_IMAGE, str(error).removeprefix(f"{key}: ")) from error


def _check_index(index: int, length: int) -> int:
    if not 0 <= index < length:
        raise IndexError(f"sample index {index} is outside [0, {length})")
    return int(index)


class FolderSource:
    """Images found recursively under ``root``, each captioned by its ``.txt`` sidecar
    (``clipforge.data.formats.folders``). Keys are image paths relative to ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: no such folder")
        self.relative_paths = [path.relative_to(self.root).as_posix() for path in image_files(self.root)]
        if not self.relative_paths:
            raise InputError(f"{self.root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.dropped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.relative_paths)

    def key(self, index: int) -> str:
        return self.relative_paths[_check_index(index, len(self))]

    def load(self, index: int) -> tuple[Image.Image, str]:
        key = self.key(index)
        caption = sidecar_caption(self.root / key, key)
        return _decode_image(self.root / key, key), caption


class ManifestSource:
    """Rows of a CSV, TSV, parquet or JSONL manifest (``clipforge.data.formats.tables``): an image column
    (paths, encoded bytes or ``{bytes, path}`` structs) and a caption column, auto-detected unless named.
    Relative paths resolve against ``root`` (default: the manifest's folder). Keys are the paths as
    written (``"<manifest> row <i>"`` for bytes or a blank path).
    """

    def __init__(
        self,
        path: str | Path,
        image_column: str | None = None,
        caption_column: str | None = None,
        root: str | Path | None = None,
    ) -> None:
        self.path = Path(path)
        self.table = read_caption_table(self.path, image_column, caption_column)
        self.image_column, self.caption_column = self.table.image_column, self.table.value_column
        self.root = Path(root) if root is not None else self.path.parent
        if len(self) == 0:
            raise InputError(f"{self.path}: the manifest has no rows")
        self.dropped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.table)

    def key(self, index: int) -> str:
        index = _check_index(index, len(self))
        return self.table.image_path(index) or f"{self.path.name} row {index}"

    def load(self, index: int) -> tuple[Image.Image, str]:
        key = self.key(index)
        caption = self.table.caption(index, key)
        image = self.table.image(index, self.root)
        if image is None:
            raise SampleError(key, MISSING_IMAGE, f"no {self.image_column!r} value")
        return _decode_image(image, key), caption


class WebDatasetSource:
    """Samples of webdataset tar shards (``clipforge.data.formats.shards``) that have an image or a
    ``.txt`` caption: ``{key}.jpg|png|webp|...`` and ``{key}.txt``; other members are ignored.

    Keys are ``"<shard>:<sample key>"``. A missing shard is an ``InputError``; an empty one gives no
    samples and is listed in ``dropped`` as an "empty shard".
    """

    def __init__(self, shards: str | Sequence[str]) -> None:
        self.shards = [Path(path) for path in expand_shards(shards)]
        if not self.shards:
            raise ConfigError("webdataset source: no shard paths given")
        self.indexes = shard_indexes(self.shards)
        self.rows = [index.samples_with((*IMAGE_FIELDS, CAPTION_FIELD)) for index in self.indexes]
        self.dropped = [(str(shard), EMPTY_SHARD) for shard, rows in zip(self.shards, self.rows) if len(rows) == 0]
        self._starts = list(itertools.accumulate((len(rows) for rows in self.rows), initial=0))
        if len(self) == 0:
            raise InputError(f"{self.shards[0]}: every one of the {len(self.shards)} shards is empty")

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        index = _check_index(index, len(self))
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, self.rows[shard][index - self._starts[shard]]

    def key(self, index: int) -> str:
        shard, row = self._locate(index)
        return self.indexes[shard].label(row)

    def load(self, index: int) -> tuple[Image.Image, str]:
        shard, row = self._locate(index)
        key, shard_index = self.key(index), self.indexes[shard]
        caption = shard_index.caption(row)
        image = shard_index.image(row)
        if image is None:
            fields = [f".{field}" for field in IMAGE_FIELDS]
            raise SampleError(key, MISSING_IMAGE, f"no {', '.join(fields[:-1])} or {fields[-1]} member")
        return _decode_image(image.read(), key), caption


MULTI_CAPTION_FIELD = "captions.json"
MIN_CAPTION_WORDS = 2


def caption_list(raw: bytes, key: str) -> list[str]:
    """The texts of a ``captions.json`` member: ``original`` then every list under ``rewrites`` and ``synthetic``
    (``{"original": [...], "rewrites": {name: [...]}, "synthetic": {name: [...]}}``), blanks dropped."""
    try:
        record = json.loads(raw)
        groups = [record.get("original", []), *record.get("rewrites", {}).values(), *record.get("synthetic", {}).values()]
    except (ValueError, AttributeError) as error:
        raise SampleError(key, f"unreadable {MULTI_CAPTION_FIELD}", one_line(error)) from None
    if not all(isinstance(group, list) and all(isinstance(text, str) for text in group) for group in groups):
        raise SampleError(key, f"unreadable {MULTI_CAPTION_FIELD}", "caption groups must be lists of strings")
    return [text.strip() for group in groups for text in group if text.strip()]


class MultiCaptionSource:
    """Shards whose samples carry several captions (a ``captions.json`` member: ``clipforge curate rewrite``).

    LaCLIP (Fan et al., "Improving CLIP Training with Language Rewrites", NeurIPS 2023; LijieFan/LaCLIP
    ``data.py: CsvDatasetAugCap``): every visit of a sample draws one of its captions uniformly, falling back to
    the ``.txt`` caption when the drawn one has fewer than two words. The draw uses the sample's generator
    (seeded by seed, epoch and index in ``clipforge.data.loader``), so runs are reproducible and resume exactly.
    ``load`` (evaluation, embedding) gives the ``.txt`` caption, as for plain shards.
    """

    def __init__(self, shards: WebDatasetSource) -> None:
        self.shards = shards
        self.dropped = shards.dropped

    def __len__(self) -> int:
        return len(self.shards)

    def key(self, index: int) -> str:
        return self.shards.key(index)

    def load(self, index: int) -> tuple[Image.Image, str]:
        return self.shards.load(index)

    def captions(self, index: int, caption: str) -> list[str]:
        """The sample's captions: its ``captions.json`` texts (or just ``caption``, its ``.txt``, without one)."""
        shard, row = self.shards._locate(index)
        raw = self.shards.indexes[shard].read(row, MULTI_CAPTION_FIELD)
        return (caption_list(raw, self.key(index)) if raw is not None else []) or [caption]

    def load_train(self, index: int, transform: Callable[..., Any], generator: Any) -> tuple[Any, str]:
        image, caption = self.load(index)
        options = self.captions(index, caption)
        chosen = options[int(torch.randint(len(options), (1,), generator=generator))]
        if len(chosen.split()) < MIN_CAPTION_WORDS:
            chosen = caption
        return transform(image, generator=None if isinstance(transform, EvalTransform) else generator), chosen


def _shard_source(shards: str | Sequence[str]) -> WebDatasetSource | MultiCaptionSource:
    """Plain shards, or multi-caption ones when any shard has a ``captions.json`` member."""
    source = WebDatasetSource(shards)
    if any(MULTI_CAPTION_FIELD in index.field_names for index in source.indexes):
        return MultiCaptionSource(source)
    return source


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
        return _shard_source(parts)
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
        return _shard_source(shards) if shards else FolderSource(path)
    if path.suffix.lower() in TABLE_SUFFIXES:
        return ManifestSource(path)
    if not path.exists():
        raise InputError(f"{text}: no such file or folder")
    raise ConfigError(
        f"{text}: not a data source (expected a folder, .tar shards, a {', '.join(TABLE_SUFFIXES)} manifest "
        "or 'synthetic')"
    )
